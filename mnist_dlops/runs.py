"""The runs table: every training run under ``lightning_logs/``, its settings and results, offline.

    python -m mnist_dlops.runs                                   # all runs, newest last
    python -m mnist_dlops.runs --sort val/acc --where "model=MLP,val/acc>0.99"
    python -m mnist_dlops.runs --csv runs.csv --plot val/loss   # also write a CSV and a PNG of the curves

Metrics are read from the run's ``metrics.csv`` when it has one, else from its TensorBoard events, with
TensorBoard's own reader. Runs logged only to W&B or Neptune list their settings and checkpoint, no metrics.
"""

from __future__ import annotations

import operator
import re
from datetime import datetime
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from mnist_dlops.rundir import recorded_best, training_runs

_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "=": operator.eq, ">": operator.gt, "<": operator.lt}


def history(run: Path) -> pd.DataFrame:
    """Every logged scalar of a run as rows of (tag, step, value)."""
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


def run_row(run: Path) -> dict[str, object]:
    """One row of the table: key settings, tags, data fingerprint and git commit (short), best ``val/*``, last
    ``test/*``, best checkpoint and date."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
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
    provenance_file = run / "provenance.yaml"
    provenance = yaml.safe_load(provenance_file.read_text()) if provenance_file.is_file() else {}
    row["data"] = ((provenance.get("data") or {}).get("fingerprint") or "")[:12]
    code = provenance.get("code") or {}
    row["commit"] = (code.get("commit") or "")[:10] + ("+dirty" if code.get("dirty") else "")
    scalars = history(run)
    for tag, values in scalars.groupby("tag")["value"]:
        if tag.startswith("val/"):
            row[tag] = values.min() if "loss" in tag else values.max()
    for tag, values in scalars.groupby("tag")["value"]:
        if tag.startswith("test/"):
            row[tag] = values.iloc[-1]
    row["best_checkpoint"] = best_checkpoint(run)
    return row


def runs_table(runs_dir: Path) -> pd.DataFrame:
    """The table of every training run under ``runs_dir``."""
    return pd.DataFrame([run_row(run) for run in training_runs(runs_dir)])


def apply_where(table: pd.DataFrame, condition: str) -> pd.DataFrame:
    """Keep the rows meeting ``column<op>value`` (``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``)."""
    match = re.fullmatch(r"\s*([^<>=!]+?)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*", condition)
    if not match or match.group(1) not in table.columns:
        columns = ", ".join(table.columns)
        raise ValueError(f"--where {condition!r}: expected <column><op><value> with a column among: {columns}")
    column, op, value = match.groups()
    try:
        target: object = float(value)
        values = pd.to_numeric(table[column], errors="coerce")
    except ValueError:
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
    """
    table = runs_table(Path(runs_dir))
    if table.empty:
        print(f"no training runs under {runs_dir}")
        return table
    for condition in (where or "").split(","):
        if condition.strip():
            table = apply_where(table, condition)
    if sort:
        if sort not in table.columns:
            raise ValueError(f"--sort {sort!r}: no such column (columns: {', '.join(table.columns)})")
        table = table.sort_values(sort, ascending=ascending)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 70):
        print(table.drop(columns=["best_checkpoint"]).to_string(index=False))
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
