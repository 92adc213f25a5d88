"""The runs table on real runs: its rows and best checkpoints, ``--where`` mistakes as one line, runs logged to
neither CSV nor TensorBoard."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_faults import TINY, fails, lab, trained  # noqa: F401 - lab, trained: fixtures

from mnist_dlops.cli.app import cli_main
from mnist_dlops.commands.runs import runs


@pytest.mark.parametrize("where", ["task==", "val/acc>>0.9", "val/acc>abc", "nosuchcolumn=1"])
def test_runs_where_errors(trained: Path, where: str) -> None:
    with pytest.raises(ValueError, match="--where"):
        runs(where=where)


def test_runs_table(trained: Path, capsys: pytest.CaptureFixture) -> None:
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]", "--run.tags", "[baseline, cpu]"])
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]", "--run.tags", "[baseline]"])
    capsys.readouterr()
    assert list(runs(where="tags=baseline")["run"]) == ["version_1", "version_2"]
    assert list(runs(where="tags=baseline,cpu")["run"]) == ["version_1"]
    assert list(runs(where="tags=cpu,lr>0.001")["run"]) == ["version_1"]
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 120, lines
    assert "NaN" not in "\n".join(lines)  # test/acc of runs never tested is blank
    with pytest.raises(ValueError, match="--where 'task=binary': no run matches .*task takes: multiclass\\)"):
        runs(where="task=binary")
    with pytest.raises(ValueError, match="tags takes: baseline, baseline,cpu\\)"):
        runs(where="tags=nosuch")
    for kwargs in ({"csv": "no/such/folder/runs.csv"}, {"plot": "val/loss", "plot_file": "no/such/runs.png"}):
        with pytest.raises(ValueError, match="no folder no/such"):
            runs(**kwargs)
    with pytest.raises(ValueError, match="no such folder"):
        runs(runs_dir="/no/such/dir")
    # One corrupt record: that run is skipped with a warning naming the file, the others are listed.
    (trained / "provenance.yaml").write_text("{{{ not yaml")
    assert list(runs()["run"]) == ["version_1", "version_2"]
    assert "provenance.yaml" in capsys.readouterr().err


def test_runs_table_without_csv_or_tensorboard(lab: Path) -> None:
    """A run tracked only by W&B (offline) still shows its metrics: the run's own record holds them."""
    cli_main(["fit", *TINY, "--trainer.callbacks", "[]", "--trainer.logger",
              "mnist_dlops.trackers.wandb.WandbLogger"])
    cli_main(["test", "--ckpt_path", "last", "--trainer.enable_progress_bar", "false", "--data.data_dir", "data"])
    table = runs()
    assert 0 <= table["val/acc"].iloc[0] <= 1 and 0 <= table["test/acc"].iloc[0] <= 1


def test_an_older_run_with_a_damaged_last_checkpoint_is_still_listed(trained: Path) -> None:
    """A run from before checkpoints/best.json, whose last.ckpt is garbage: listed, its best taken from the file
    names (the damaged checkpoint is the evaluation's business, not the table's)."""
    checkpoints = trained / "checkpoints"
    (checkpoints / "best.json").unlink()
    (checkpoints / "last.ckpt").write_bytes(b"PK\x03\x04 garbage")
    table = runs(runs_dir=str(trained.parent))
    assert list(table["run"]) == ["version_0"]
    assert table["best_checkpoint"][0] == str(sorted(checkpoints.glob("epoch*.ckpt"))[-1])
