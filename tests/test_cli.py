"""The real CLI: every shipped config parses, --print_config round-trips, fit -> test on real MNIST works."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, cli_in_process, read_scalars, run_cli

from mnist_dlops import MNISTModule
from mnist_dlops.cli.app import cli_main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _print_config(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def _within(mine: object, resolved: object) -> bool:
    """Whether every value set in ``mine`` appears in ``resolved`` (which also holds the defaults)."""
    if isinstance(mine, dict):
        return isinstance(resolved, dict) and all(k in resolved and _within(v, resolved[k]) for k, v in mine.items())
    if isinstance(mine, list):
        return isinstance(resolved, list) and len(mine) == len(resolved) and all(map(_within, mine, resolved))
    return mine == resolved


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_alone_and_stacked(config: Path, capsys: pytest.CaptureFixture) -> None:
    alone = yaml.safe_load(_print_config(capsys, "-c", str(config)))
    stacked = yaml.safe_load(_print_config(capsys, "-c", str(config), "-c", str(REPO / "configs" / "debug.yaml")))
    assert _within(yaml.safe_load(config.read_text()), alone)  # what the file sets is what the parser resolved
    assert stacked["trainer"]["limit_train_batches"] == 20


def test_default_experiment_is_the_fast_cnn_with_tensorboard(capsys: pytest.CaptureFixture) -> None:
    config = yaml.safe_load(_print_config(capsys))
    assert config["model"]["network"]["class_path"] == "mnist_dlops.networks.FastCNN"
    assert config["trainer"]["logger"]["class_path"] == "mnist_dlops.trackers.tensorboard.TensorBoardLogger"
    assert config["checkpoint"]["monitor"] == "val/loss" and config["checkpoint"]["save_last"] is True
    assert "class_names" not in config["model"]  # derived from the data module, never set by hand


def test_print_config_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    binary = str(REPO / "configs" / "binary.yaml")
    first = _print_config(capsys, "-c", binary, "--data.batch_size", "32", "--trainer.max_epochs", "5")
    saved = tmp_path / "printed.yaml"
    saved.write_text(first)
    assert _print_config(capsys, "--config", str(saved)) == first


def test_binary_config_links_two_outputs(capsys: pytest.CaptureFixture) -> None:
    from mnist_dlops.cli.app import MNISTCLI
    from mnist_dlops.data import MNISTDataModule

    cli = MNISTCLI(
        MNISTModule,
        MNISTDataModule,
        args=["-c", str(REPO / "configs" / "binary.yaml")],
        run=False,
        auto_configure_optimizers=False,
    )
    assert cli.model.class_names == ["no 3", "3"]
    assert cli.model.network.layers[-1].out_features == 2


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A seconds-long fit on the real MNIST; yields the working directory."""
    cwd = tmp_path_factory.mktemp("debug_run")
    result = cli_in_process("fit", "-c", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(mnist_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_fit_writes_one_run_directory(debug_run: Path) -> None:
    run = debug_run / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file()
    assert not (debug_run / "config.yaml").exists()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints
    assert any(name.startswith("epoch00-val_loss") for name in checkpoints), checkpoints
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["limit_train_batches"] == 20
    scalars = read_scalars(run)
    assert {"train/loss", "val/loss", "val/acc", "val/f1", "val/precision", "val/recall", "train/acc"} <= set(scalars)
    assert 0.5 < scalars["val/acc"][-1] <= 1.0  # 20 steps of a CNN on real digits is far above chance (0.1)


def test_checkpoint_loads_with_weights_only(debug_run: Path) -> None:
    ckpt_path = debug_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams["network"]["class_path"] == "mnist_dlops.networks.FastCNN"
    assert hparams["class_names"] == [str(d) for d in range(10)]
    assert ckpt["datamodule_hyper_parameters"]["task"] == "multiclass"
    model = MNISTModule.load_from_checkpoint(ckpt_path, weights_only=True)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        expected = model(images)
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_test_subcommand_lands_in_the_checkpoints_run(debug_run: Path, mnist_dir: Path) -> None:
    run = debug_run / "lightning_logs" / "version_0"
    best = next((run / "checkpoints").glob("epoch*.ckpt"))
    config_before = (run / "config.yaml").read_text()
    result = run_cli("test", "--data.data_dir", str(mnist_dir), "--ckpt_path", str(best), cwd=debug_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout
    assert [p.name for p in (debug_run / "lightning_logs").iterdir()] == ["version_0"]  # no new run
    assert (run / "config.yaml").read_text() == config_before and (run / "config.test.yaml").is_file()
    scalars = read_scalars(run)
    assert abs(scalars["test/acc"][-1] - scalars["val/acc"][-1]) < 0.05  # same weights, same distribution


@pytest.mark.slow  # several runs: in `pytest -m slow` and CI, to keep the default run near 10 minutes
def test_consecutive_runs_get_their_own_directories(tmp_path: Path, tiny_idx: Path) -> None:
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    for _ in range(2):
        result = cli_in_process("fit", "-c", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(tiny_idx),
                         "--data.val_size", "50", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    assert all((tmp_path / "lightning_logs" / r / "checkpoints" / "last.ckpt").is_file() for r in runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]  # nothing in the working directory


@pytest.mark.slow  # several runs or processes: in `pytest -m slow` and CI, to keep the default run short
def test_ddp_on_cpu_shares_one_run_directory(tmp_path: Path, tiny_idx: Path) -> None:
    """Lightning's DDP launcher re-runs the CLI per process: all of them must write into the one claimed run."""
    result = run_cli(
        "fit", "-c", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(tiny_idx), "--data.val_size", "50",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # real data or several processes: run by `pytest -m slow` and CI
def test_ddp_validation_matches_a_single_process(tmp_path: Path, mnist_dir: Path) -> None:
    """2-process DDP on CPU (gloo) evaluates each validation image once: its metrics equal a single process's."""
    common = ["--data.data_dir", str(mnist_dir), "--data.val_size", "1001", "-c", str(REPO / "configs" / "csv.yaml")]
    fit = run_cli("fit", *common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "30",
                  "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    single = run_cli("validate", "--ckpt_path", ckpt, "--data.eval_batch_size", "100", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli("validate", "--ckpt_path", ckpt, "--data.eval_batch_size", "100", "--trainer.strategy", "ddp",
                  "--trainer.devices", "2", "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "lightning_logs" / "version_0" / "metrics.csv").dropna(subset=["val/acc"])
    a, b = rows.iloc[-2], rows.iloc[-1]
    # 1,001 images (odd: the ranks get 501 and 500, none padded or dropped): every metric agrees.
    for metric in ("val/acc", "val/precision", "val/recall", "val/f1"):
        assert a[metric] == pytest.approx(b[metric], abs=1e-6), metric
    assert a["val/loss"] == pytest.approx(b["val/loss"], abs=2e-3)  # a mean of the ranks' means
