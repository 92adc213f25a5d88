"""Champion against challenger: a candidate version takes the production alias only if it is not worse on any
fixed evaluation set."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from mnist_dlops.errors import ConfigError, invoked


def eval_sets(mnist_dir: str, feedback_dir: Optional[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed sets both versions are judged on: MNIST test, and the held-out feedback when there is one."""
    from mnist_dlops.data.idx import read_idx_split
    from mnist_dlops.data.images import read_png_split

    images, labels = read_idx_split(Path(mnist_dir), "test")
    sets = {"mnist_test": (images.numpy(), labels.numpy())}
    if feedback_dir and any((Path(feedback_dir) / "test").rglob("*.png")):  # none held out yet: MNIST alone
        images, labels = read_png_split(Path(feedback_dir), "test", {str(d): d for d in range(10)})
        sets["feedback_test"] = (images.numpy(), labels.numpy())
    return sets


def evaluate(forward: Any, images: np.ndarray, labels: np.ndarray, classes: int) -> dict[str, Any]:
    """Accuracy, accuracy per class and the expected calibration error (10 bins) of ``forward`` on one set."""
    import torch
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    probs = []
    with torch.inference_mode():
        for start in range(0, len(images), 1000):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + 1000]))[:, None]
            probs.append(forward(chunk).float().numpy())
    p, target = torch.from_numpy(np.concatenate(probs)), torch.from_numpy(labels).long()
    per_class = multiclass_accuracy(p, target, classes, average=None).tolist()
    present = torch.bincount(target, minlength=classes).tolist()  # a class with no image has no accuracy
    return {"acc": float(multiclass_accuracy(p, target, classes, average="micro")), "n": int(len(labels)),
            "per_class": {str(c): per_class[c] if present[c] else None for c in range(classes)},
            "ece": float(multiclass_calibration_error(p, target, classes, n_bins=10, norm="l1"))}


def verdict(results: dict[str, dict[str, dict[str, Any]]], tolerance: float) -> tuple[bool, list[str]]:
    """Whether the candidate is not worse than the champion beyond ``tolerance`` on any set, and why not."""
    worse = [f"{name}: {r['candidate']['acc']:.4f} < {r['champion']['acc']:.4f} - {tolerance}"
             for name, r in results.items() if r["candidate"]["acc"] < r["champion"]["acc"] - tolerance]
    return not worse, worse


def table(results: dict[str, dict[str, dict[str, Any]]], champion: str, candidate: str) -> str:
    lines = [f"{'set':<14} {'n':>6} {'champion v' + champion:>14} {'candidate v' + candidate:>15} {'delta':>8} "
             f"{'ECE champ.':>10} {'ECE cand.':>10}  worst class delta"]
    for name, r in results.items():
        deltas = {c: (r["candidate"]["per_class"][c] or 0) - (r["champion"]["per_class"][c] or 0)
                  for c in r["candidate"]["per_class"] if r["candidate"]["per_class"][c] is not None}
        worst = min(deltas, key=deltas.get) if deltas else "-"
        lines.append(f"{name:<14} {r['candidate']['n']:>6} {r['champion']['acc']:>14.4f} {r['candidate']['acc']:>15.4f} "
                     f"{r['candidate']['acc'] - r['champion']['acc']:>+8.4f} {r['champion']['ece']:>10.4f} "
                     f"{r['candidate']['ece']:>10.4f}  {worst}: {deltas.get(worst, 0):+.4f}")
    return "\n".join(lines)


def promote(
    name: str,
    candidate: Union[int, Literal["latest"]] = "latest",
    alias: str = "production",
    mnist_dir: str = "data/mnist",
    feedback_dir: Optional[str] = None,
    tolerance: float = 0.002,
    floor: float = 0.9,
    force: bool = False,
    runs_dir: str = "lightning_logs",
    tracking_uri: Optional[str] = None,
) -> bool:
    """Compare a candidate version with the one ``alias`` names, on the same sets; move the alias if it is not worse.

    Args:
        name: The registered model.
        candidate: The version that would take the alias: a number, or ``latest`` (the newest version).
        alias: The alias of the version in service (the champion).
        mnist_dir: The MNIST IDX folder whose test split both are judged on.
        feedback_dir: A feedback data version (``mnist-dlops datasets feedback``): its held-out ``test/``
            share is the second set.
        tolerance: How much lower the candidate's accuracy may be on a set and still pass (0.002: two in a thousand).
        floor: The lowest accuracy on every set a version needs to take an alias no version holds yet.
        force: Move the alias whatever the comparison says (recorded on the version as ``gate.forced``).
        runs_dir: Folder of the runs (the default MLflow store).
        tracking_uri: The MLflow store; default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<runs_dir>/mlflow.db``.

    Returns:
        Whether the alias now names the candidate.
    """
    from mlflow.exceptions import MlflowException

    from mnist_dlops.model.served import check, from_registry
    from mnist_dlops.trackers.mlflow_store import model_exists, registry_client, store_step

    if tolerance < 0 or not 0 <= floor <= 1:
        raise ConfigError(f"tolerance={tolerance}: must be >= 0" if tolerance < 0
                          else f"floor={floor}: must be in [0, 1]")
    if feedback_dir and not Path(feedback_dir).is_dir():
        raise ConfigError(f"feedback_dir={feedback_dir}: no such folder ({invoked('datasets feedback')} --out "
                          f"{feedback_dir} writes it)")
    with store_step(f"promote {name}"):
        client = registry_client(runs_dir, tracking_uri)
        if not model_exists(client, name):
            raise ConfigError(f"name={name}: no registered model of that name")
        if candidate == "latest":
            candidate = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
            print(f"candidate: version {candidate}, the newest of {name}")
        try:
            client.get_model_version(name, str(candidate))
        except MlflowException:
            raise ConfigError(f"candidate={candidate}: {name} has no such version") from None
        try:
            champion = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            champion = None
    location = client.tracking_uri
    if champion == str(candidate):
        print(f"{name}@{alias} -> version {candidate} (already)")
        return True
    sets = eval_sets(mnist_dir, feedback_dir)
    roles = {"candidate": str(candidate), **({"champion": champion} if champion else {})}
    models = {role: from_registry(f"models:/{name}/{version}", tracking_uri=location)
              for role, version in roles.items()}
    for served in models.values():
        check(served)  # a version that cannot predict is refused before any comparison
    forwards = {role: served.load() for role, served in models.items()}
    classes = len(models["candidate"].class_names)
    results = {set_name: {role: evaluate(forwards[role], images, labels, classes) for role in forwards}
               for set_name, (images, labels) in sets.items()}
    if champion is None:  # the first holder of the alias: judged against the stated floor
        low = [f"{s}: {r['candidate']['acc']:.4f} < {floor}"
               for s, r in results.items() if r["candidate"]["acc"] < floor]
        for set_name, r in results.items():
            print(f"{set_name}: version {candidate} accuracy {r['candidate']['acc']:.4f} (floor {floor})")
        if not low or force:
            with store_step(f"alias {name}@{alias}"):
                client.set_registered_model_alias(name, alias, str(candidate))
            print(f"{name}@{alias} -> version {candidate} (no version held it; "
                  f"{'forced, although: ' + '; '.join(low) if low else 'above the floor on every set'})")
            return True
        print(f"{name}@{alias} stays unset: version {candidate} is below the floor on {'; '.join(low)}")
        return False
    passed, reasons = verdict(results, tolerance)
    moved = passed or force
    print(table(results, champion, str(candidate)))
    record = {"champion": champion, "candidate": str(candidate), "alias": alias, "tolerance": tolerance,
              "passed": passed, "forced": bool(force and not passed), "reasons": reasons, "results": results}
    with store_step(f"recording the gate on {name} version {candidate}"):
        tags = {"gate.champion": champion, "gate.passed": str(passed), "gate.forced": str(bool(force and not passed)),
                **{f"gate.{s}.acc": f"{r['candidate']['acc']:.6f}" for s, r in results.items()},
                **{f"gate.{s}.champion_acc": f"{r['champion']['acc']:.6f}" for s, r in results.items()}}
        for key, value in tags.items():
            client.set_model_version_tag(name, str(candidate), key, value)
        run_id = client.get_model_version(name, str(candidate)).run_id
        if run_id:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / f"gate-v{candidate}.json").write_text(json.dumps(record, indent=1))
                client.log_artifact(run_id, str(Path(tmp) / f"gate-v{candidate}.json"), "gate")
        if moved:
            client.set_registered_model_alias(name, alias, str(candidate))
    if moved:
        within = any(r["candidate"]["acc"] < r["champion"]["acc"] for r in results.values())
        how = ("forced, although: " + "; ".join(reasons) if not passed
               else f"within the allowed {tolerance} of it on every set" if within else "not worse on any set")
        print(f"{name}@{alias} -> version {candidate} ({how})")
    else:
        print(f"{name}@{alias} stays on version {champion}: the candidate is worse on {'; '.join(reasons)}")
    return moved
