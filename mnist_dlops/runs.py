"""Runs: one directory per run (claimed, found, named into), and the runs table of every training run under
``lightning_logs/``, its settings and results, offline.

    python -m mnist_dlops.runs                                   # all runs, newest last
    python -m mnist_dlops.runs --sort val/acc --where "model=MLP,val/acc>0.99"
    python -m mnist_dlops.runs --csv runs.csv --plot val/loss   # also write a CSV and a PNG of the curves

Metrics are read from the run's ``metrics.csv`` when it has one, else from its TensorBoard events, with
TensorBoard's own reader; whatever the trackers, each stage's last values are also in its ``provenance*.yaml``,
so runs logged only to W&B or Neptune show them too. The table fits a terminal; ``--csv`` has every column.
"""

from __future__ import annotations

import operator
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from mnist_dlops.dvc_data import version_label

if TYPE_CHECKING:  # pandas is imported by the table's functions only: the CLI claims run folders without it
    import pandas as pd

_VERSION = re.compile(r"version_(\d+)$")


# One run, one directory: Lightning lets each logger pick its own folder and version, so two trackers of one run
# could disagree (TensorBoard in version_3, CSV in version_4). The CLI claims the directory first and gives it to the
# trainer and to every logger whose save_dir is null.
def claim_run_dir(runs_dir: Path) -> Path:
    """Create and return ``runs_dir/version_N`` for the lowest free N.

    ``mkdir`` either creates the directory or fails because it exists, atomically, so two runs started at the same
    instant never share a directory.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in runs_dir.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (runs_dir / f"version_{n}").mkdir()
            return runs_dir / f"version_{n}"
        except FileExistsError:
            n += 1


def training_runs(runs_dir: Path) -> list[Path]:
    """The run folders under ``runs_dir`` that hold a training config, in version order."""
    runs = [p for p in runs_dir.glob("version_*") if _VERSION.match(p.name) and (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda p: int(_VERSION.match(p.name).group(1)))


def recorded_best(last_checkpoint: dict[str, Any], folder: Path) -> tuple[Optional[str], Optional[Path]]:
    """The best checkpoint the checkpoint callback recorded in a loaded ``last.ckpt``: (recorded path, existing file).

    The file is looked up in ``folder`` (where last.ckpt is) first, so a moved run still finds it; None if gone.
    """
    states = last_checkpoint.get("callbacks", {}).values()
    best = next((s["best_model_path"] for s in states if isinstance(s, dict) and s.get("best_model_path")), None)
    if not best:
        return None, None
    found = next((c for c in (folder / Path(best).name, Path(best)) if c.is_file()), None)
    return best, found


def run_dir_of(ckpt_path: str | None) -> Path | None:
    """The run directory a checkpoint was written in (``<run>/checkpoints/x.ckpt``), if it is one of ours."""
    if not ckpt_path:
        return None
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / "config.yaml").is_file() else None


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


def _short(class_path: Optional[str]) -> Optional[str]:
    return class_path.rsplit(".", 1)[-1] if class_path else None


def best_checkpoint(run: Path) -> Optional[str]:
    """The best checkpoint the run's checkpoint callback recorded (or its last ``epoch*.ckpt``)."""
    candidates = sorted((run / "checkpoints").glob("epoch*.ckpt"))
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        import torch

        try:
            _, found = recorded_best(torch.load(last, map_location="cpu", weights_only=True), last.parent)
            if found is not None:
                return str(found)
        except Exception:  # an unreadable last.ckpt must not hide the run: fall back to the file names
            pass
    return str(candidates[-1]) if candidates else None


def _read_yaml(path: Path) -> dict:
    """A run's YAML record, or an error naming the file."""
    try:
        content = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a mapping")
    return content


def run_row(run: Path) -> dict[str, object]:
    """One row of the table: key settings, tags, data fingerprint and git commit (short), best ``val/*``, last
    ``test/*``, best checkpoint and date."""
    config = _read_yaml(run / "config.yaml")
    model, data, trainer = config.get("model") or {}, config.get("data") or {}, config.get("trainer") or {}
    optimizer = model.get("optimizer") or {}
    row: dict[str, object] = {
        "run": run.name,
        "date": datetime.fromtimestamp((run / "config.yaml").stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
        "model": _short((model.get("network") or {}).get("class_path")),
        "task": data.get("task", "multiclass") + (f" ({data.get('digit', 3)})" if data.get("task") == "binary" else ""),
        "optimizer": _short(optimizer.get("class_path")),
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
    row["best_checkpoint"] = best_checkpoint(run)
    return row


def runs_table(runs_dir: Path) -> pd.DataFrame:
    """The table of every training run under ``runs_dir``; a run whose record cannot be read is skipped, saying so."""
    import sys

    import pandas as pd

    rows = []
    for run in training_runs(runs_dir):
        try:
            rows.append(run_row(run))
        except ValueError as err:
            print(f"warning: skipping {run.name}: {err}", file=sys.stderr)
    return pd.DataFrame(rows)


# What the table shows in a terminal; ``--csv`` and ``--all_columns`` have the rest.
COMPACT = ["run", "sweep", "trial", "state", "model", "task", "lr", "batch_size", "epochs", "tags", "data_version",
           "val/acc", "val/loss", "test/acc", "date"]
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
        raise ValueError(f"--where {condition!r}: expected <column><op><value> with a column among: {columns}")
    column, op, value = match.groups()
    if not value or value[0] in "<>=!":
        raise ValueError(f"--where {condition!r}: no value after {op!r}")
    if column == "tags" and op in ("=", "!="):
        wanted = {tag.strip() for tag in value.split(",")}
        has = table["tags"].map(lambda tags: wanted <= set(str(tags).split(",")))
        return table[has if op == "=" else ~has]
    try:
        target: object = float(value)
        values = pd.to_numeric(table[column], errors="coerce")
    except ValueError:
        if op not in ("=", "!="):
            raise ValueError(f"--where {condition!r}: {op!r} needs a number, not {value!r}") from None
        target, values = value, table[column].astype(str)
    return table[_OPS[op](values, target)]


def plot_curves(runs_dir: Path, runs: list[str], metric: str, out: Path) -> Path:
    """Draw ``metric`` over steps for each of ``runs`` into one PNG."""
    from mnist_dlops.plots import plt

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
        raise ValueError(f"--runs_dir {runs_dir}: no such folder")
    for flag, file in (("--csv", csv), ("--plot_file", plot_file if plot else None)):
        if file and not Path(file).resolve().parent.is_dir():
            raise ValueError(f"{flag} {file}: no folder {Path(file).parent} to write it into")
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
        raise ValueError(f"--where {where!r}: no run matches ({len(everything)} runs; {column} takes: {seen or 'no value'})")
    if sort:
        if sort not in table.columns:
            raise ValueError(f"--sort {sort!r}: no such column (columns: {', '.join(table.columns)})")
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


def main() -> None:
    """``python -m mnist_dlops.runs``: the table, with one-line errors for bad options."""
    import sys

    from jsonargparse import CLI

    try:
        CLI(runs, as_positional=False)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
