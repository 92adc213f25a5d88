"""``mnist-dlops runs``: the table of every training run under a runs folder, its settings and results, offline."""

from __future__ import annotations

import operator
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from mnist_dlops.data.versions import version_label
from mnist_dlops.errors import CheckpointError, ConfigError, DataError, UserError, command
from mnist_dlops.rundir.folders import training_runs
from mnist_dlops.rundir.run import read_best, short
from mnist_dlops.writeguard import allow_writes

if TYPE_CHECKING:  # pandas is imported by the table's functions only: the CLI claims run folders without it
    import pandas as pd


_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq, ">": operator.gt, "<": operator.lt}


def history(run: Path) -> pd.DataFrame:
    """Every logged scalar of a run as rows of (tag, step, value)."""
    import pandas as pd

    metrics_csv = run / "metrics.csv"
    if metrics_csv.is_file():
        wide = pd.read_csv(metrics_csv)
        long = wide.melt(id_vars=["step"], value_vars=[c for c in wide.columns if c not in ("step", "epoch")])
        return long.dropna().rename(columns={"variable": "tag"})[["tag", "step", "value"]]
    if any(run.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
        acc.Reload()
        rows = [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
        return pd.DataFrame(rows, columns=["tag", "step", "value"])
    return pd.DataFrame(columns=["tag", "step", "value"])


def _last_epoch_file(run: Path) -> Optional[str]:
    """A run whose best checkpoint is unknown: its last ``epoch*.ckpt``."""
    candidates = sorted((run / "checkpoints").glob("epoch*.ckpt"))
    return str(candidates[-1]) if candidates else None


def _read_yaml(path: Path) -> dict:
    """A run's YAML record, or an error naming the file."""
    try:
        content = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a mapping")
    return content


def _section(config: dict, key: str, path: Path) -> dict:
    """``config[key]``, a mapping (or empty); anything else is an error naming the file and the key."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise DataError(f"{path}: {key} is {value!r}, not a mapping")
    return value


def run_row(run: Path) -> dict[str, object]:
    """One row of the table: key settings, tags, data fingerprint and git commit (short), best ``val/*``, last
    ``test/*``, best checkpoint and date."""
    config = _read_yaml(run / "config.yaml")
    model, data, trainer = (_section(config, key, run / "config.yaml") for key in ("model", "data", "trainer"))
    optimizer = _section(model, "optimizer", run / "config.yaml")
    row: dict[str, object] = {
        "run": run.name,
        "date": datetime.fromtimestamp((run / "config.yaml").stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
        "model": short((model.get("network") or {}).get("class_path")),
        "task": data.get("task", "multiclass") + (f" ({data.get('digit', 3)})" if data.get("task") == "binary" else ""),
        "optimizer": short(optimizer.get("class_path")),
        # The peak the schedule follows: its max_lr when one is set, else the optimizer's lr.
        "lr": ((model.get("lr_scheduler") or {}).get("init_args") or {}).get("max_lr")
        or (optimizer.get("init_args") or {}).get("lr"),
        "batch_size": data.get("batch_size"),
        "epochs": trainer.get("max_epochs"),
    }
    run_labels = config.get("run") or {}
    row["tags"] = ",".join(run_labels.get("tags") or [])
    row["note"] = run_labels.get("note") or ""
    provenance = _read_yaml(run / "provenance.yaml")
    sweep = provenance.get("sweep") or {}
    row["sweep"], row["trial"], row["state"] = sweep.get("study", ""), sweep.get("trial", ""), sweep.get("state", "")
    row["data"] = ((provenance.get("data") or {}).get("fingerprint") or "")[:12]
    row["data_version"] = version_label((provenance.get("data") or {}).get("version"))
    code = provenance.get("code") or {}
    row["commit"] = (code.get("commit") or "")[:10] + ("+dirty" if code.get("dirty") else "")
    # Tracker-independent last values first (fit, then each later evaluation), then the curves' best val/*.
    later = [_read_yaml(p) for p in sorted(run.glob("provenance.*.yaml"), key=lambda p: p.stat().st_mtime)]
    for record in [provenance, *later]:
        for tag, value in (record.get("metrics") or {}).items():
            if tag.startswith(("val/", "test/")):
                row[tag] = value
    scalars = history(run)
    for tag, values in scalars.groupby("tag")["value"]:
        if tag.startswith("val/"):
            row[tag] = values.min() if "loss" in tag else values.max()
        elif tag.startswith("test/"):
            row[tag] = values.iloc[-1]
    try:
        best = read_best(run)
    except CheckpointError:  # an older run's unreadable last.ckpt must not hide the run: its file names will do
        best = None
    row["best_checkpoint"] = str(best.path) if best and best.path else _last_epoch_file(run)
    return row


def runs_table(runs_dir: Path) -> pd.DataFrame:
    """The table of every training run under ``runs_dir``; a run whose record cannot be read is skipped, saying so."""
    import sys

    import pandas as pd

    rows = []
    for run in training_runs(runs_dir):
        try:
            rows.append(run_row(run))
        except UserError as err:
            print(f"warning: skipping {run.name}: {err}", file=sys.stderr)
    return pd.DataFrame(rows)


# What the table shows in a terminal; ``--csv`` and ``--all_columns`` have the rest.
COMPACT = ["run", "sweep", "trial", "state", "model", "task", "lr", "batch_size", "epochs", "tags", "data_version",
           "val/acc", "val/loss", "test/acc", "date"]
# --where's small language, not DataFrame.query: query needs backticks around `val/acc` and has no `tags=a,b`.
_CONDITION = re.compile(r"\s*([^<>=!,]+?)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*")


def split_conditions(where: str) -> list[str]:
    """``a=1,b>2`` into conditions; a piece without an operator continues the one before (``tags=a,b``)."""
    conditions: list[str] = []
    for piece in where.split(","):
        if conditions and not _CONDITION.fullmatch(piece):
            conditions[-1] += "," + piece
        elif piece.strip():
            conditions.append(piece)
    return conditions


def apply_where(table: pd.DataFrame, condition: str) -> pd.DataFrame:
    """Keep the rows meeting ``column<op>value`` (``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``); ``tags=a,b`` keeps
    the runs holding every one of those tags."""
    import pandas as pd

    match = _CONDITION.fullmatch(condition)
    if not match or match.group(1) not in table.columns:
        columns = ", ".join(table.columns)
        raise ConfigError(f"--where {condition!r}: expected <column><op><value> with a column among: {columns}")
    column, op, value = match.groups()
    if not value or value[0] in "<>=!":
        raise ConfigError(f"--where {condition!r}: no value after {op!r}")
    if column == "tags" and op in ("=", "!="):
        wanted = {tag.strip() for tag in value.split(",")}
        has = table["tags"].map(lambda tags: wanted <= set(str(tags).split(",")))
        return table[has if op == "=" else ~has]
    try:
        target: object = float(value)
        values = pd.to_numeric(table[column], errors="coerce")
    except ValueError:
        if op not in ("=", "!="):
            raise ConfigError(f"--where {condition!r}: {op!r} needs a number, not {value!r}") from None
        target, values = value, table[column].astype(str)
    return table[_OPS[op](values, target)]


def plot_curves(runs_dir: Path, runs: list[str], metric: str, out: Path) -> Path:
    """Draw ``metric`` over steps for each of ``runs`` into one PNG."""
    from mnist_dlops.callbacks.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for name in runs:
        series = history(runs_dir / name)
        series = series[series["tag"] == metric].sort_values("step")
        if len(series):
            ax.plot(series["step"], series["value"], marker="." if len(series) < 30 else None, label=name)
    ax.set(title=metric, xlabel="step", ylabel=metric)
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def runs(
    runs_dir: str = "lightning_logs",
    sort: Optional[str] = None,
    ascending: bool = False,
    where: Optional[str] = None,
    csv: Optional[str] = None,
    plot: Optional[str] = None,
    plot_file: str = "runs.png",
    all_columns: bool = False,
) -> pd.DataFrame:
    """List the training runs: settings, best validation and test metrics, best checkpoint, date.

    Args:
        runs_dir: Folder holding the ``version_N`` run folders.
        sort: Column to sort by (e.g. ``val/acc``); descending unless ``ascending``.
        ascending: Sort in increasing order.
        where: Filters such as ``task=multiclass`` or ``val/acc>0.99``, comma-separated; all must hold.
        csv: Also write the table to this CSV file.
        plot: A metric (e.g. ``val/loss``) to draw over steps for the listed runs, into ``plot_file``.
        plot_file: The PNG file for ``plot``.
        all_columns: Print every column (settings, data fingerprint, commit, every metric), not a terminal's width.
    """
    import pandas as pd

    if not Path(runs_dir).is_dir():
        raise ConfigError(f"--runs_dir {runs_dir}: no such folder")
    for flag, file in (("--csv", csv), ("--plot_file", plot_file if plot else None)):
        if file and not Path(file).resolve().parent.is_dir():
            raise ConfigError(f"{flag} {file}: no folder {Path(file).parent} to write it into")
        if file:
            allow_writes(file, flag)
    table = runs_table(Path(runs_dir))
    if table.empty:
        print(f"no training runs under {runs_dir}")
        return table
    everything = table
    for condition in split_conditions(where or ""):
        table = apply_where(table, condition)
    if table.empty:
        column = _CONDITION.fullmatch(split_conditions(where or "")[-1]).group(1)
        seen = ", ".join(sorted({str(v) for v in everything[column].dropna() if str(v) != ""})[:10])
        raise ConfigError(f"--where {where!r}: no run matches ({len(everything)} runs; {column} takes: {seen or 'no value'})")
    if sort:
        if sort not in table.columns:
            raise ConfigError(f"--sort {sort!r}: no such column (columns: {', '.join(table.columns)})")
        table = table.sort_values(sort, ascending=ascending)
    compact = [c for c in COMPACT if c in table.columns and table[c].astype(str).ne("").any()]
    shown = table if all_columns else table[compact]
    width = 250 if all_columns else 120
    with pd.option_context("display.max_columns", None, "display.width", width, "display.max_colwidth", 40,
                           "display.precision", 4):
        # A metric a run never logged (test/acc before `test`) is blank, not NaN.
        print(shown.drop(columns=["best_checkpoint"], errors="ignore").to_string(index=False, na_rep=""))
        print("\nbest checkpoints:\n" + "\n".join(f"  {r}: {c}" for r, c in zip(table["run"], table["best_checkpoint"])))
    if csv:
        table.to_csv(csv, index=False)
        print(f"wrote {csv}")
    if plot:
        print(f"wrote {plot_curves(Path(runs_dir), list(table['run']), plot, Path(plot_file))}")
    return table


def main(argv: Optional[list[str]] = None) -> None:
    """``mnist-dlops runs``: the table, with one-line errors for bad options."""
    command(runs, argv, "runs", as_positional=False)
