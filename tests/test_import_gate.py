"""The import gate at its edges: a database URL's driver, the gate itself, a sweep file's nested configs. Each
attempt would create a marker file (tests/test_security.py's payloads); none may."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from test_security import EVIL_MODULE, TINY, lab, markers, nested  # noqa: F401 - lab, nested: fixtures

from mnist_dlops.cli.app import cli_main

DATABASE_URLS = ["mysql://user:s3cret@127.0.0.1/db", "mysql+mysqldb://user:s3cret@127.0.0.1/db",
                 "mssql+pyodbc://user:s3cret@dsn", "sqlite:///"]


@pytest.mark.parametrize("url", DATABASE_URLS)
def test_a_database_url_never_imports_a_planted_driver(lab: Path, capsys: pytest.CaptureFixture, url: str) -> None:
    """SQLAlchemy imports a URL's driver by module name (``MySQLdb``): only the drivers we ship are accepted, and
    the password never reaches the message."""
    from mnist_dlops.cli.sweep import main as sweep_main
    from mnist_dlops.commands.registry import main as registry_main

    for driver in ("MySQLdb", "pyodbc"):
        (lab / f"{driver}.py").write_text(EVIL_MODULE)
    (lab / "sweep.yaml").write_text(yaml.safe_dump({
        "study_name": "s", "storage": url, "n_trials": 1,
        "space": {"model.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}))
    attempts = [
        lambda: sweep_main(["-c", "sweep.yaml", "--data.data_dir", "data", *TINY]),
        lambda: registry_main(["register", "--sweep", "s", "--sweep_storage", url]),
        lambda: registry_main(["list", "--tracking_uri", url]),
        lambda: cli_main(["fit", "--trainer.logger", "mnist_dlops.trackers.mlflow.MLFlowLogger",
                          "--trainer.logger.tracking_uri", url, "--data.data_dir", "data", *TINY]),
    ]
    for attempt in attempts:
        with pytest.raises(SystemExit) as exit_info:
            attempt()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "s3cret" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: "), err
    assert markers(lab) == []


def test_the_gate_refuses_what_is_not_installed_and_allows_what_is(lab: Path) -> None:
    """The gate itself: a planted module and a standard module whose import acts are refused; installed packages,
    the standard library and a package the user trusts by name load."""
    from mnist_dlops.importguard import UntrustedImport, guarded_imports

    with guarded_imports():
        for name in ("evil_mod", "antigravity"):
            with pytest.raises(UntrustedImport, match=name):
                __import__(name)
        import json  # noqa: F401 - already loaded: nothing to find

        import optuna.visualization  # noqa: F401 - an installed package
        import tomllib  # noqa: F401 - the standard library
    assert markers(lab) == [] and "evil_mod" not in sys.modules
    os.environ["MNIST_DLOPS_TRUST"] = "evil_mod"
    try:
        with guarded_imports():
            __import__("evil_mod")
    finally:
        del os.environ["MNIST_DLOPS_TRUST"]
    assert markers(lab) == ["MARKER_import"]




def test_a_sweep_file_cannot_import_a_planted_module(nested: Path, capsys: pytest.CaptureFixture) -> None:
    """Through a sweep's base configs, its fixed values and a categorical choice, each naming a nested file."""
    from mnist_dlops.cli.sweep import main as sweep_main

    lr = {"model.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    attempts = [
        {"base": ["cfg_nested.yaml"], "space": lr},
        {"fixed": {"model.network": "net_evil.yaml"}, "space": lr},
        {"space": {"model.network": {"type": "categorical", "choices": ["evil_mod.Net", "net_evil.yaml"]}}},
    ]
    for attempt in attempts:
        (nested / "sweep.yaml").write_text(yaml.safe_dump({"study_name": "s", "n_trials": 1, **attempt}))
        with pytest.raises(SystemExit) as exit_info:
            sweep_main(["-c", "sweep.yaml", "--data.data_dir", "data", *TINY])
        assert exit_info.value.code == 2, attempt
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    assert markers(nested) == []
