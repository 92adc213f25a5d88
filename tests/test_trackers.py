"""Each tracker's files, read back with that tracker's own reader or schema; one run directory whatever the trackers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, cli_in_process, read_scalars

DEBUG = str(REPO / "configs" / "debug.yaml")


def wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` file, parsed with W&B's own protobuf schema.

    The file is a LevelDB-style log (wandb 0.31 ships no Python reader): a 7-byte header (":W&B", magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block trailer / padding
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def neptune_operations(run_dir: Path) -> list[dict]:
    """The operations the neptune client queued offline (one JSON object a line)."""
    files = sorted((run_dir / ".neptune" / "offline").glob("run__*/data-*.log"))
    assert files, f"no Neptune offline data in {run_dir}"
    return [json.loads(line)["obj"] for f in files for line in f.read_text().splitlines() if line.strip()]


def _fit(cwd: Path, mnist_dir: Path, *configs: str) -> Path:
    """A debug fit with these configs (and ``--flag value`` pairs among them) in ``cwd``; its run folder."""
    args = [a for c in configs for a in (("-c", str(REPO / "configs" / c)) if c.endswith(".yaml") else (c,))]
    cwd.mkdir(parents=True, exist_ok=True)
    result = cli_in_process("fit", *args, "-c", DEBUG, "--data.data_dir", str(mnist_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((cwd / "lightning_logs").iterdir())
    return runs[-1]


def test_tensorboard_holds_metrics_and_the_full_config(tmp_path: Path, mnist_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = _fit(tmp_path, mnist_dir, "tensorboard.yaml")
    assert {"val/acc", "val/loss", "train/loss"} <= set(read_scalars(run))
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["data/task"].string_value == "multiclass"
    assert hparams["model/network/class_path"].string_value == "mnist_dlops.networks.FastCNN"
    # The HParams tab compares runs by their real metrics, not Lightning's placeholder hp_metric = -1.
    experiment = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    columns = [m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos]
    assert {"val/acc", "val/loss", "test/acc"} <= set(columns)
    assert "hp_metric" not in columns and "hp_metric" not in read_scalars(run)
    # Hardware use comes after the model's own train metrics, in TensorBoard's sorted list, not as groups before them.
    tags = sorted(acc.Tags()["scalars"])
    system = [i for i, tag in enumerate(tags) if "system" in tag]
    assert system and all(tags[i].startswith("train/system/") for i in system)
    assert max(i for i, tag in enumerate(tags) if tag.startswith("train/") and i not in system) < min(system)
    assert {tag.split("/")[0] for tag in tags} <= {"epoch", "train", "val"}


def test_csv_reads_with_pandas_and_keeps_hparams(tmp_path: Path, mnist_dir: Path) -> None:
    run = _fit(tmp_path, mnist_dir, "csv.yaml")
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"train/loss", "val/acc", "val/loss", "step", "epoch"} <= set(metrics.columns)
    assert metrics["val/acc"].dropna().between(0.5, 1.0).all()
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["data"]["task"] == "multiclass" and hparams["trainer"]["limit_train_batches"] == 20


def test_wandb_offline_run_holds_config_and_metrics(tmp_path: Path, mnist_dir: Path) -> None:
    run = _fit(tmp_path, mnist_dir, "wandb.yaml")
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    config = {u.key: u.value_json for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert json.loads(config["data"])["task"] == "multiclass"
    history = {
        i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item
    }
    assert {"val/acc", "train/loss"} <= history
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "mnist-dlops" and list(run_record.tags) == ["mnist"]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "config.yaml").exists()


def test_neptune_offline_run_holds_parameters_metrics_and_checkpoints(tmp_path: Path, mnist_dir: Path) -> None:
    run = _fit(tmp_path, mnist_dir, "neptune.yaml")
    ops = neptune_operations(run)
    params = {"/".join(op["path"]): op.get("value") for op in ops if op["path"][0] == "parameters"}
    assert params["parameters/data/task"] == "multiclass"
    assert params["parameters/model/network/class_path"] == "mnist_dlops.networks.FastCNN"
    val_acc = [v["value"] for op in ops if op["path"] == ["val", "acc"] for v in op["values"]]
    assert val_acc and 0.5 < val_acc[-1] <= 1.0
    uploads = {"/".join(op["path"]): op["file_path"] for op in ops if op["type"] == "UploadFile"}
    assert Path(uploads["checkpoints/last"]).name == "last.ckpt"
    tags = [v for op in ops if op["path"] == ["sys", "tags"] for v in op["values"]]
    assert tags == ["mnist"]


@pytest.mark.slow  # a long real run or a server: in `pytest -m slow` and CI, to keep the default run short
def test_all_trackers_share_one_run_and_test_lands_in_it(tmp_path: Path, mnist_dir: Path) -> None:
    run = _fit(tmp_path, mnist_dir, "all_trackers.yaml")
    rows_after_fit = len(pd.read_csv(run / "metrics.csv"))
    result = cli_in_process(
        "test", "-c", str(REPO / "configs" / "all_trackers.yaml"), "--data.data_dir", str(mnist_dir),
        "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # One run folder; beside it only MLflow's store, shared by every run of the folder (its database and artifacts).
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == sorted(
        [run.name, "mlflow.db", "mlflow.db.lock", "mlflow-artifacts"])
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == rows_after_fit + 1 and metrics["test/acc"].notna().sum() == 1  # fit history kept
    assert "test/acc" in read_scalars(run)
    wandb_runs = sorted(run.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1  # same W&B run id
    test_acc = [v for op in neptune_operations(run) if op["path"] == ["test", "acc"] for v in op["values"]]
    assert len(test_acc) == 1
    # Neptune: one offline container per stage, each carrying the run's id, which groups them once synced.
    containers = sorted((run / ".neptune" / "offline").glob("run__*"))
    custom_id = (run / ".neptune" / "custom_run_id").read_text().strip()
    for container in containers:
        ops = [json.loads(line)["obj"] for f in container.glob("data-*.log") for line in f.read_text().splitlines()]
        assert [op["value"] for op in ops if op["path"] == ["mnist_dlops", "run_id"]] == [custom_id]
    assert len(containers) == 2


@pytest.mark.slow  # several runs: in `pytest -m slow` and CI, to keep the default run near 10 minutes
def test_two_wandb_runs_in_a_row_with_a_bogus_key_finish_offline(tmp_path: Path, mnist_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # "configured", but bogus
    for expected in ("version_0", "version_1"):
        start = time.perf_counter()
        # Offline here: no server answers; with a network, W&B refuses the bogus key. Either way the user is told.
        with pytest.warns(UserWarning, match="W&B server not reachable|W&B online start failed"):
            run = _fit(tmp_path, mnist_dir, "wandb.yaml")
        print(f"\nW&B run with a bogus key and no server: {time.perf_counter() - start:.1f} s wall")
        assert run.name == expected and len(list(run.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]


def test_wandb_falls_back_offline_from_a_silent_server_and_keeps_its_files_in_the_run(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts the connection and never answers costs connect_timeout, not W&B's init timeout (30 s);
    W&B's staging area (the plots' tables) and its cache are inside the run, not in the user's home."""
    import socket
    import threading

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():  # bounded: ends with the test
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # "configured"
    try:
        start = time.perf_counter()
        with pytest.warns(UserWarning, match="W&B server not reachable: logging offline"):  # the user is told
            run = _fit(tmp_path / "work", mnist_dir, "wandb.yaml", "--trainer.logger.init_args.connect_timeout", "2")
        seconds = time.perf_counter() - start
    finally:
        stop.set()
        thread.join()
        silent.close()
        for conn in accepted:
            conn.close()
    assert accepted, "the W&B logger never tried the server"
    assert len(list(run.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert seconds < 30, f"{seconds:.1f} s: waited on the silent server beyond connect_timeout"
    assert not list(home.rglob("*")), sorted(home.rglob("*"))[:5]  # nothing of the run in the home directory
    assert list(run.glob("wandb/data/artifacts/staging")) or list(run.glob("wandb/cache"))


def test_help_imports_no_tracker_client() -> None:
    code = (
        "import sys, runpy; sys.argv = ['cli.py', 'fit', '--help']\n"
        "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('wandb', 'neptune') if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr[-2000:]


def test_neptune_flushes_while_running_and_logs_images(tmp_path: Path) -> None:
    from PIL import Image

    from mnist_dlops.trackers.neptune import NeptuneLogger

    logger = NeptuneLogger(save_dir=str(tmp_path), flush_interval=0.0)
    logger.log_metrics({"train/loss": 0.5}, step=3)
    logger.save()  # what Lightning calls after logging: the data must be on disk before the run ends
    on_disk = neptune_operations(tmp_path)
    assert any(op["path"] == ["train", "loss"] and op["values"][0]["step"] == 3 for op in on_disk)
    logger.log_image("plots/digit", [Image.new("L", (28, 28), 255)], step=3)
    logger.finalize("success")
    ops = neptune_operations(tmp_path)
    assert any(op["path"] == ["plots", "digit"] and op["type"] == "LogImages" for op in ops)
    assert {"path": ["status"], "type": "AssignString", "value": "success"}.items() <= next(
        op for op in ops if op["path"] == ["status"]
    ).items()


def test_a_logged_step_is_on_disk_at_once(tmp_path: Path) -> None:
    """Lightning logs a step's metrics after that step's checkpoint: the CSV and TensorBoard trackers write them to
    disk at once, so a run killed right after is resumed with every step it logged (read by each tracker's reader)."""
    from mnist_dlops.trackers.csv import CSVLogger
    from mnist_dlops.trackers.tensorboard import TensorBoardLogger

    csv_logger, tb_logger = CSVLogger(str(tmp_path / "csv")), TensorBoardLogger(str(tmp_path / "tb"))
    for logger in (csv_logger, tb_logger):
        logger.log_metrics({"train/loss": 0.5}, step=69)
    assert pd.read_csv(Path(csv_logger.log_dir) / "metrics.csv")[["step", "train/loss"]].values.tolist() == [[69, 0.5]]
    assert read_scalars(Path(tb_logger.log_dir)) == {"train/loss": [0.5]}
