"""Configs, flags and checkpoints from a stranger never run code: every attempt below would create a marker file.

Each payload is live: ``test_the_payloads_are_live`` shows that each one creates its marker when it is allowed to
run. The attempts then go through the CLI (in-process, ``cli_main``), ``mnist-dlops export`` and
``MNISTModule.load_from_checkpoint``, and each must fail with one line naming the key, and leave no marker.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import forge, make_idx_set

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.export import export
from mnist_dlops.errors import CheckpointError, ConfigError
from mnist_dlops.module import MNISTModule
from mnist_dlops.rundir.checkpoints import STATE_KEY

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--data.val_size", "20", "--trainer.enable_progress_bar", "false", "--data.download", "false"]

# A module that writes its marker when it is imported, and again when its classes or function are called.
EVIL_MODULE = '''
from pathlib import Path
from torch import nn
from pytorch_lightning import Callback
Path(__file__).with_name("MARKER_import").write_text("imported")

def hook(*args, **kwargs):
    Path(__file__).with_name("MARKER_call").write_text("called")

class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        Path(__file__).with_name("MARKER_call").write_text("built")
        self.layer = nn.Linear(784, num_classes)

    def forward(self, x):
        return self.layer(x.flatten(1))

class Evil(Callback):
    def __init__(self):
        Path(__file__).with_name("MARKER_call").write_text("built")
'''


# The user's own network, which writes nothing.
OWN_MODULE = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.layer = nn.Linear(784, num_classes)

    def forward(self, x):
        return self.layer(x.flatten(1))
'''


class _Payload:
    """Unpickling this opens (creates) the marker file: a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with a pickle payload, an importable hostile module, and tiny data."""
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Payload(tmp_path / "MARKER_pickle")))
    (tmp_path / "evil_mod.py").write_text(EVIL_MODULE)
    make_idx_set(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # evil_mod is importable, as a file dropped on a server would be
    yield tmp_path
    sys.modules.pop("evil_mod", None)


def markers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("MARKER*"))


def refused(args: list[str], capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """Run the CLI in-process; it must exit 2 with one ``error:`` line holding every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, last
    return last


def test_the_payloads_are_live(lab: Path) -> None:
    """Without the checks, each payload runs: the absence of a marker below means something."""
    with pytest.raises(RuntimeError, match="magic number"):  # torch checks the header after unpickling it
        torch.load(lab / "evil.pkl", weights_only=False)
    import evil_mod

    evil_mod.hook()
    assert markers(lab) == ["MARKER_call", "MARKER_import", "MARKER_pickle"]


LOADER = {"f": "evil.pkl", "weights_only": False}
CONFIG_ATTEMPTS = {
    # loaders: functions that unpickle a file, in torch, numpy and pandas
    "torch.load": ({"model": {"network": {"class_path": "torch.load", "init_args": LOADER}}}, "model.network"),
    "torch.jit.load": ({"model": {"network": {"class_path": "torch.jit.load", "init_args": {"f": "evil.pkl"}}}},
                       "model.network"),
    "numpy.load": ({"model": {"network": {"class_path": "numpy.load",
                                          "init_args": {"file": "evil.pkl", "allow_pickle": True}}}}, "model.network"),
    "pandas.read_pickle": ({"model": {"network": {"class_path": "pandas.read_pickle",
                                                  "init_args": {"filepath_or_buffer": "evil.pkl"}}}}, "model.network"),
    # factories that return a real nn.Module, or a Lightning classmethod that loads a checkpoint
    "torch.hub.load": ({"model": {"network": {"class_path": "torch.hub.load",
                                              "init_args": {"repo_or_dir": ".", "model": "x", "source": "local"}}}},
                       "model.network"),
    "classmethod": ({"model": {"network": {"class_path": "pytorch_lightning.LightningModule.load_from_checkpoint",
                                           "init_args": {"checkpoint_path": "evil.pkl", "weights_only": False}}}},
                    "model.network"),
    # a Lightning / jsonargparse utility that reads files
    "lightning util": ({"model": {"network": {"class_path": "pytorch_lightning.core.saving.load_hparams_from_yaml",
                                              "init_args": {"config_yaml": "evil.pkl"}}}}, "model.network"),
    "jsonargparse": ({"model": {"network": {"class_path": "jsonargparse.CLI"}}}, "model.network"),
    # plain code runners, and a class of the wrong kind
    "os.system": ({"model": {"network": {"class_path": "os.system", "init_args": {"command": "touch MARKER_sh"}}}},
                  "model.network"),
    "subprocess.Popen": ({"trainer": {"callbacks": [{"class_path": "subprocess.Popen",
                                                     "init_args": {"args": ["touch", "MARKER_sh"]}}]}},
                         "trainer.callbacks"),
    "wrong kind": ({"model": {"optimizer": {"class_path": "torch.nn.Linear"}}}, "model.optimizer"),
    # a module whose import alone runs code, and a trusted callback handed a function to call
    "import": ({"trainer": {"callbacks": [{"class_path": "evil_mod.Evil"}]}}, "trainer.callbacks"),
    "callable arg": ({"trainer": {"callbacks": [{"class_path": "pytorch_lightning.callbacks.LambdaCallback",
                                                 "init_args": {"on_fit_start": "evil_mod.hook"}}]}},
                     "trainer.callbacks"),
    "trusted callable arg": ({"trainer": {"callbacks": [{"class_path": "pytorch_lightning.callbacks.LambdaCallback",
                                                         "init_args": {"on_fit_start": "torch.hub.load"}}]}},
                             "trainer.callbacks"),
}


@pytest.mark.parametrize("name", list(CONFIG_ATTEMPTS))
def test_config_file_cannot_run_code(lab: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    config, key = CONFIG_ATTEMPTS[name]
    (lab / "c.yaml").write_text(yaml.safe_dump(config))
    refused(["fit", "-c", "c.yaml", "--data.data_dir", "data", *TINY], capsys, key)
    assert markers(lab) == []
    assert not (lab / "lightning_logs").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--model.network", json.dumps(CONFIG_ATTEMPTS["torch.load"][0]["model"]["network"])],
        ["--model.network", "evil_mod.Net"],
        ["--model.network.class_path", "evil_mod.Net"],
        ["--trainer.callbacks+=evil_mod.Evil"],
        ["--model.network", "os.system"],
    ],
    ids=["torch.load json", "import", "class_path", "callbacks+", "function"],
)
def test_flag_cannot_run_code(lab: Path, capsys: pytest.CaptureFixture, flags: list[str]) -> None:
    refused(["fit", *flags, "--data.data_dir", "data", *TINY], capsys)
    assert markers(lab) == []


@pytest.fixture
def trained(lab: Path) -> Path:
    """A real checkpoint of a tiny run, to forge from."""
    cli_main(["fit", "--data.data_dir", "data", *TINY, "--trainer.callbacks", "[]"])
    return lab / "lightning_logs/version_0/checkpoints/last.ckpt"


def forge_network(path: Path, network: object, out: Path) -> Path:
    """A copy of the checkpoint whose saved network (hyper-parameters and config) is ``network``."""
    return forge(path, out, lambda config: config["model"].update(network=network),
                 lambda hparams: hparams.update(network=network))


CHECKPOINT_NETWORKS = {
    "torch.load": {"class_path": "torch.load", "init_args": LOADER},
    "os.system": {"class_path": "os.system", "init_args": {"command": "touch MARKER_sh"}},
    "import": {"class_path": "evil_mod.Net", "init_args": {}},
}


@pytest.mark.parametrize("name", list(CHECKPOINT_NETWORKS))
def test_checkpoint_cannot_run_code(trained: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    lab = trained.parents[3]
    forged = forge_network(trained, CHECKPOINT_NETWORKS[name], lab / "forged.ckpt")
    for command in ("test", "validate", "fit"):
        refused([command, "--ckpt_path", str(forged), "--data.data_dir", "data"], capsys, "forged.ckpt", "network")
    with pytest.raises(CheckpointError, match="not allowed"):
        MNISTModule.load_from_checkpoint(forged)
    with pytest.raises(CheckpointError, match="not allowed"):
        export(str(forged), formats=["torchscript"], out_dir=str(lab / "export"))
    assert markers(lab) == []
    assert not (lab / "export" / "model.pt").exists()


def test_own_package_works_once_trusted(lab: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's own network: refused with the hint, then trained once the user trusts the package."""
    last = refused(["fit", "--model.network", "evil_mod.Net", "--data.data_dir", "data", *TINY], capsys)
    assert "MNIST_DLOPS_TRUST=evil_mod" in last
    assert markers(lab) == []
    monkeypatch.setenv("MNIST_DLOPS_TRUST", "evil_mod")
    # Trusted code runs, and is under the write gate like any: its marker beside the config is refused.
    refused(["fit", "--model.network", "evil_mod.Net", "--data.data_dir", "data", *TINY], capsys,
            "refused to write", "MARKER_import")
    assert markers(lab) == []
    (lab / "own_net.py").write_text(OWN_MODULE)
    monkeypatch.setenv("MNIST_DLOPS_TRUST", "own_net")
    cli_main(["fit", "--model.network", "own_net.Net", "--data.data_dir", "data", *TINY])
    ckpt = lab / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert isinstance(MNISTModule.load_from_checkpoint(ckpt).network, sys.modules["own_net"].Net)
    monkeypatch.delenv("MNIST_DLOPS_TRUST")
    with pytest.raises(CheckpointError, match="MNIST_DLOPS_TRUST=own_net"):
        MNISTModule.load_from_checkpoint(ckpt)
    sys.modules.pop("own_net", None)


# --- The import gate: whatever path a name takes to an import, a planted module never runs ------------------------


@pytest.fixture
def nested(lab: Path) -> Path:
    """YAML files that name the planted module only inside other files, where no scan of argv looks."""
    (lab / "model_evil.yaml").write_text("network:\n  class_path: evil_mod.Net\n")
    (lab / "net_evil.yaml").write_text("class_path: evil_mod.Net\n")
    (lab / "cfg_nested.yaml").write_text(f"model: {lab / 'model_evil.yaml'}\n")
    (lab / "lightning.py").write_text(EVIL_MODULE)  # shadows a trusted name that is not installed here
    return lab


NESTED_ATTEMPTS = {
    "flag names a file": ["--model", "model_evil.yaml"],
    "subclass flag names a file": ["--model.network", "net_evil.yaml"],
    "config names a file": ["-c", "cfg_nested.yaml"],
    "print_config": ["-c", "cfg_nested.yaml", "--print_config"],
    "trusted name shadowed": ["--trainer.callbacks+=lightning.Evil"],
}


@pytest.mark.parametrize("name", list(NESTED_ATTEMPTS))
def test_nested_files_cannot_import_a_planted_module(nested: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    last = refused(["fit", *NESTED_ATTEMPTS[name], "--data.data_dir", "data", *TINY], capsys, "refused to import")
    assert "evil_mod" in last or "lightning" in last
    assert markers(nested) == []
    assert not (nested / "lightning_logs").exists()


def forge_config(path: Path, network: object, out: Path, key: str = "hyper_parameters") -> Path:
    """A copy of the checkpoint whose stored run config and hyper-parameters (under ``key``) name ``network``."""
    checkpoint = torch.load(path, weights_only=True)
    hparams = checkpoint.pop("hyper_parameters")
    checkpoint[key] = {**hparams, "network": network}
    if key != "hyper_parameters":  # Lightning reads the legacy keys only beside the current one
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k != "network"}
    config = yaml.safe_load(checkpoint[STATE_KEY]["config"])
    config["model"]["network"] = network
    checkpoint[STATE_KEY]["config"] = yaml.safe_dump(config)
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize(
    "network,key",
    [("evil_mod.Net", "hyper_parameters"), ("NESTED", "hyper_parameters"), ("evil_mod.Net", "hparams")],
    ids=["plain string", "path to a YAML file", "legacy hparams key"],
)
def test_a_checkpoints_stored_names_never_import(trained: Path, capsys: pytest.CaptureFixture,
                                                 network: str, key: str) -> None:
    """Through every entry point that reads a checkpoint: test, validate, predict, fit-resume, export, register,
    serve's loader and ``load_from_checkpoint``."""
    from mnist_dlops.commands.registry import register
    from mnist_dlops.model.served import resolve

    lab = trained.parents[3]
    (lab / "net_evil.yaml").write_text("class_path: evil_mod.Net\n")
    network = str(lab / "net_evil.yaml") if network == "NESTED" else network
    forged = forge_config(trained, network, lab / "forged.ckpt", key)
    for command in ("test", "validate", "predict", "fit"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--ckpt_path", str(forged), "--data.data_dir", "data"])
        assert exit_info.value.code == 2, command
        assert "Traceback" not in capsys.readouterr().err
    for attempt in (lambda: MNISTModule.load_from_checkpoint(forged),
                    lambda: export(str(forged), formats=["torchscript"], out_dir=str(lab / "export")),
                    lambda: register(ckpt_path=str(forged), runs_dir=str(lab / "lightning_logs")),
                    lambda: resolve(None, str(forged), str(lab / "lightning_logs"))):
        with pytest.raises((CheckpointError, ConfigError)):
            attempt()
    assert markers(lab) == []
