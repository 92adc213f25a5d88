"""Configs, flags and checkpoints from a stranger never run code: every attempt below would create a marker file.

Each payload is live: ``test_the_payloads_are_live`` shows that each one creates its marker when it is allowed to
run. The attempts then go through the CLI (in-process, ``cli_main``), ``python -m mnist_dlops.export`` and
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

from conftest import make_idx_set

from mnist_dlops.checkpoints import STATE_KEY
from mnist_dlops.cli import cli_main
from mnist_dlops.errors import CheckpointError
from mnist_dlops.export import export
from mnist_dlops.module import MNISTModule

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


def forge(path: Path, network: object, out: Path) -> Path:
    """A copy of the checkpoint whose saved network (hyper-parameters and config) is ``network``."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["network"] = network
    config = yaml.safe_load(checkpoint[STATE_KEY]["config"])
    config["model"]["network"] = network
    checkpoint[STATE_KEY]["config"] = yaml.safe_dump(config)
    torch.save(checkpoint, out)
    torch.load(out, weights_only=True)  # still plain data: weights_only alone would accept it
    return out


CHECKPOINT_NETWORKS = {
    "torch.load": {"class_path": "torch.load", "init_args": LOADER},
    "os.system": {"class_path": "os.system", "init_args": {"command": "touch MARKER_sh"}},
    "import": {"class_path": "evil_mod.Net", "init_args": {}},
}


@pytest.mark.parametrize("name", list(CHECKPOINT_NETWORKS))
def test_checkpoint_cannot_run_code(trained: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    lab = trained.parents[3]
    forged = forge(trained, CHECKPOINT_NETWORKS[name], lab / "forged.ckpt")
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
    cli_main(["fit", "--model.network", "evil_mod.Net", "--data.data_dir", "data", *TINY])
    ckpt = lab / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert isinstance(MNISTModule.load_from_checkpoint(ckpt).network, sys.modules["evil_mod"].Net)
    monkeypatch.delenv("MNIST_DLOPS_TRUST")
    with pytest.raises(CheckpointError, match="MNIST_DLOPS_TRUST=evil_mod"):
        MNISTModule.load_from_checkpoint(ckpt)
