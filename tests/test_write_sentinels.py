"""A run writes and deletes only inside its own directory: a sentinel tree beside it keeps its checksums whatever a
flag, a study name or a crafted checkpoint asks (the write gate's wider cases: tests/test_write_gate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_security import TINY, lab, refused  # noqa: F401 - lab: a fixture

from mnist_dlops.cli.app import cli_main
from mnist_dlops.module import MNISTModule


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` but the runs, the data (its fingerprint cache) and the configs, by md5."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not {"lightning_logs", "data"} & set(p.parts) and p.suffix != ".yaml"}


@pytest.fixture
def sentinel(lab: Path) -> Path:
    """A folder outside any run, holding a checkpoint, a study's files and a victim file."""
    outside = lab / "outside"
    (outside / "trav").mkdir(parents=True)
    (outside / "epoch=0.ckpt").write_bytes(b"precious")
    (outside / "trav" / "trials.csv").write_text("precious\n")
    (outside / "trav" / "best.yaml").write_text("precious: true\n")
    (lab / "victim.txt").write_text("precious")
    return outside


@pytest.mark.parametrize(
    "flags",
    [
        ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath=outside"],
        ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath=outside",
         "--trainer.callbacks.enable_version_counter=false", "--trainer.callbacks.filename={epoch}"],
        ["--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
         "--trainer.callbacks.filename=../../../escaped"],
        ["--checkpoint.filename", "{epoch:/^3}escaped"],
    ],
    ids=["dirpath", "dirpath overwrite", "other callback's filename", "format spec"],
)
def test_no_checkpoint_callback_writes_outside_the_run(lab: Path, sentinel: Path, capsys: pytest.CaptureFixture,
                                                       flags: list[str]) -> None:
    """The write gate refuses the save (naming the key that asked) before a byte of it is written."""
    before = tree_digest(lab)
    refused(["fit", "--data.data_dir", "data", *TINY, *flags], capsys, "refused to",
            "dirpath" if "dirpath" in str(flags) else "filename")
    assert tree_digest(lab) == before and "outside/epoch=0.ckpt" in before
    assert not list(Path("/").glob("*escaped*")) and not list(lab.parent.glob("*escaped*"))


def test_a_folder_in_a_checkpoint_name_stays_in_the_run(lab: Path, sentinel: Path) -> None:
    before = tree_digest(lab)
    cli_main(["fit", "--data.data_dir", "data", *TINY, "--checkpoint.filename", "{epoch}/../escaped"])
    assert tree_digest(lab) == before
    assert (lab / "lightning_logs/version_0/checkpoints/escaped.ckpt").is_file()


def test_a_study_name_is_one_folder_inside_the_runs(lab: Path, sentinel: Path, capsys: pytest.CaptureFixture) -> None:
    from mnist_dlops.cli.sweep import main as sweep_main

    before = tree_digest(lab)
    for name in ("../../outside/trav", "../outside", "", "a/b", "/abs"):
        (lab / "sweep.yaml").write_text(yaml.safe_dump({
            "study_name": name, "n_trials": 1,
            "space": {"model.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}}))
        with pytest.raises(SystemExit) as exit_info:
            sweep_main(["-c", "sweep.yaml", "--data.data_dir", "data", *TINY])
        assert exit_info.value.code == 2
        assert "study_name" in capsys.readouterr().err.strip().splitlines()[-1]
    assert tree_digest(lab) == before
    assert not (lab / "lightning_logs").exists()


def test_resuming_a_crafted_checkpoint_never_deletes_outside_the_run(lab: Path, sentinel: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """A checkpoint callback's state names files it will delete as it rotates: the deletion is refused."""
    cli_main(["fit", "--data.data_dir", "data", *TINY, "--trainer.callbacks", "[]", "--trainer.max_epochs", "2",
              "--checkpoint.save_top_k", "-1"])
    trained = next((lab / "lightning_logs/version_0/checkpoints").glob("epoch00-*.ckpt"))  # half-way: resumable
    checkpoint = torch.load(trained, weights_only=True)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("RunCheckpoint"))
    dirpath = checkpoint["callbacks"][key]["dirpath"]
    escape = f"{dirpath}/../../../victim.txt"
    checkpoint["callbacks"][key].update(best_model_path=escape, last_model_path=escape, kth_best_model_path=escape,
                                        best_k_models={escape: torch.tensor(9.0)})
    torch.save(checkpoint, trained)
    before = tree_digest(lab)
    refused(["fit", "--ckpt_path", str(trained), "--trainer.max_epochs", "2"], capsys, "refused to delete",
            "victim.txt", "outside")
    MNISTModule.load_from_checkpoint(trained)  # loading alone deletes nothing
    assert (lab / "victim.txt").read_text() == "precious"
    assert tree_digest(lab) == before
