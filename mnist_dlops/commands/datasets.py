"""``mnist-dlops datasets``: make, record, list and verify data versions on DVC."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from mnist_dlops.data.idx import IDX_FILES, find_idx, read_idx_set, write_idx, write_idx_set
from mnist_dlops.data.versions import repo_root, run_command, workspace_version
from mnist_dlops.errors import ConfigError, DataError, command, invoked
from mnist_dlops.files import replacing
from mnist_dlops.writeguard import allow_writes


def relabel(src: str, out: Optional[str] = None, n: int = 500, seed: int = 0) -> None:
    """Change ``n`` training labels of an IDX set, each to another digit drawn at random: a noisy version.

    Args:
        src: The IDX folder to start from.
        out: Where to write the new version (default: ``src`` itself, replaced whole).
        n: How many training labels to change (the test split is kept as it is).
        seed: Seed of which labels change and to what.
    """
    splits = read_idx_set(Path(src))
    images, labels = splits["train"]
    if not 0 < n <= len(labels):
        raise ConfigError(f"n={n}: must be between 1 and the {len(labels)} training labels")
    rng = np.random.default_rng(seed)
    which = rng.choice(len(labels), size=n, replace=False)
    labels = labels.copy()
    labels[which] = (labels[which] + rng.integers(1, 10, size=n)) % 10  # never the label it had
    with replacing(Path(out or src)) as folder:  # the images and the test split as they are: copied, not rewritten
        for stem in (*IDX_FILES["test"], IDX_FILES["train"][0]):
            shutil.copy2(find_idx(Path(src), stem), folder)
        write_idx(folder / f"{IDX_FILES['train'][1]}.gz", labels)
    print(f"relabelled {n} of {len(labels)} training labels (seed {seed}) into {out or src}")


def merge(src: str, extra: str, out: Optional[str] = None) -> None:
    """An IDX set plus a folder of labelled PNG digits (``<extra>/<digit>/*.png``) added to its training split.

    Args:
        src: The IDX folder to start from.
        extra: A folder of PNG digits, one sub-folder per digit (any size: each is made an MNIST-style 28x28 image).
        out: Where to write the new version (default: ``src`` itself, replaced whole).
    """
    splits = read_idx_set(Path(src))
    if Path(extra).is_dir() and not any(Path(extra).rglob("*.png")):  # no feedback yet: the set as it is
        write_idx_set(Path(out or src), splits)
        print(f"no digits in {extra}: {out or src} holds {src} as it is")
        return
    from mnist_dlops.data.images import read_png_folder  # torch: only for PNGs

    pictures, files = read_png_folder(Path(extra))
    labels = [file.parent.name for file in files]
    wrong = sorted({name for name in labels if name not in {str(d) for d in range(10)}})
    if wrong:
        raise DataError(f"{extra}: sub-folders must be named by their digit 0-9, not {', '.join(wrong[:3])}")
    images, train_labels = splits["train"]
    splits["train"] = (np.concatenate([images, pictures.numpy()]),
                       np.concatenate([train_labels, np.array(labels, dtype=np.uint8)]))
    write_idx_set(Path(out or src), splits)
    print(f"added {len(files)} digits from {extra} to the {len(train_labels)} training images into {out or src}")


def png(src: str, out: str) -> None:
    """Write an IDX set as the seeds' PNG tree: ``<out>/train/<digit>/<n>.png`` and ``<out>/test/<digit>/<n>.png``.

    Args:
        src: The IDX folder.
        out: The folder to write (replaced whole); train on it with ``--data.source png --data.data_dir <out>``.
    """
    from PIL import Image

    splits = read_idx_set(Path(src))
    with replacing(Path(out)) as folder:
        for split, (images, labels) in splits.items():
            for digit in range(10):
                (folder / split / str(digit)).mkdir(parents=True)
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(folder / split / str(int(label)) / f"{i:05d}.png", optimize=False)
    print(f"wrote {sum(len(labels) for _, labels in splits.values())} PNG files into {out}")


def _dvc() -> str:
    """The ``dvc`` command of this environment (the one installed beside this package)."""
    found = Path(sys.executable).with_name("dvc")
    return str(found) if found.exists() else "dvc"


def add(path: str, tag: Optional[str] = None, message: Optional[str] = None, push: bool = True) -> None:
    """Record a folder as a new data version: ``dvc add``, a git commit of its pointer, a tag, and ``dvc push``.

    Args:
        path: The data folder, inside a git repository with DVC (``git init && dvc init``).
        tag: A git tag naming the version (``v2``), so that ``--data.version v2`` finds it.
        message: The commit message (default: ``data: <path> <hash>``).
        push: Push the bytes to the default DVC remote, when one is configured.
    """
    folder = Path(path)
    root = repo_root(folder)
    if root is None:
        raise ConfigError(f"path={path}: not inside a git repository with DVC (run git init && dvc init there)")
    if not folder.is_dir():
        raise DataError(f"path={path}: no such folder")
    rel = Path(os.path.relpath(folder.resolve(), root)).as_posix()
    if not run_command(root, "git", "ls-tree", "--name-only", "HEAD", "--", ".dvc/config", check=False).strip():
        # A version committed without DVC's set-up cannot be read back at its revision.
        raise ConfigError(f"path={path}: commit DVC's set-up first: git add .dvc .dvcignore && git commit -m 'DVC'")
    if tag and run_command(root, "git", "tag", "--list", tag).strip():
        raise ConfigError(f"tag={tag}: already names a version ({invoked('datasets list')} {rel})")
    run_command(root, _dvc(), "add", "--quiet", rel)
    pointer = f"{rel}.dvc"
    md5 = (yaml.safe_load((root / pointer).read_text())["outs"][0])["md5"]
    ignore = Path(rel).parent / ".gitignore"
    ignores = [str(ignore)] if (root / ignore).is_file() else []  # DVC's entry for the folder, committed with it
    run_command(root, "git", "add", pointer, *ignores)
    if run_command(root, "git", "status", "--porcelain", "--", pointer).strip():
        run_command(root, "git", "commit", "--quiet", "-m", message or f"data: {rel} {md5[:12]}", "--", pointer,
                    *ignores)
    else:
        print(f"{rel}: unchanged since its last version ({md5[:12]})")
    # The tag goes on the commit that recorded this version of the pointer (HEAD, unless it was unchanged).
    commit = run_command(root, "git", "log", "-1", "--format=%h", "--", pointer).strip()
    if tag:
        run_command(root, "git", "tag", tag, commit)
    if push and run_command(root, _dvc(), "remote", "default", check=False).strip():
        run_command(root, _dvc(), "push", "--quiet", pointer)
    branch = run_command(root, "git", "branch", "--show-current").strip() or "a detached HEAD"
    print(f"{rel}: version {tag or commit} ({md5[:12]}, commit {commit} on branch {branch})")


def versions(path: str) -> list[dict[str, object]]:
    """Every committed version of a tracked folder, newest first: commit, date, tags, DVC hash, size, files."""
    folder = Path(path)
    root = repo_root(folder)
    if root is None:
        raise ConfigError(f"path={path}: not inside a git repository with DVC")
    pointer = f"{Path(os.path.relpath(folder.resolve(), root)).as_posix()}.dvc"
    rows = []
    for line in run_command(root, "git", "log", "--format=%H %ad", "--date=short", "--", pointer).splitlines():
        commit, date = line.split()
        out = (yaml.safe_load(run_command(root, "git", "show", f"{commit}:{pointer}")) or {}).get("outs", [{}])[0]
        tags = run_command(root, "git", "tag", "--points-at", commit).split()
        rows.append({"commit": commit[:10], "date": date, "tags": ",".join(tags), "md5": str(out.get("md5", ""))[:12],
                     "size": out.get("size"), "files": out.get("nfiles")})
    return rows


def list_versions(path: str) -> None:
    """Print every version of a tracked folder, newest first.

    Args:
        path: The data folder (``data/mnist``).
    """
    rows = versions(path)
    if not rows:
        raise ConfigError(f"path={path}: no version yet ({invoked('datasets add')} {path} --tag v1)")
    print(f"{'commit':<10}  {'date':<10}  {'tags':<12}  {'dvc md5':<12}  {'size':>10}  files")
    for row in rows:
        print(f"{row['commit']:<10}  {row['date']:<10}  {row['tags']:<12}  {row['md5']:<12}  {row['size']:>10}  "
              f"{row['files']}")


def verify(path: str, record: Optional[str] = None) -> None:
    """Check that a tracked folder is its DVC version (not modified since ``dvc add``) and say which version it is.

    Args:
        path: The data folder (``data/mnist``).
        record: Also write the version (DVC hash, pointer commit, tags) to this YAML file (a pipeline's record).
    """
    version = workspace_version(Path(path))
    if version is None:
        raise DataError(f"path={path}: not tracked by DVC ({invoked('datasets add')} {path})")
    if record:
        allow_writes(record, "record")
        Path(record).parent.mkdir(parents=True, exist_ok=True)
        Path(record).write_text(yaml.safe_dump(version.as_dict(), sort_keys=False))
    print(f"{path}: {version}")


def feedback(out: str = "data/feedback", url: Optional[str] = None, holdout: float = 0.2,
             tag: Optional[str] = None, runs_dir: str = "lightning_logs") -> None:
    """The users' confirmed and corrected digits (``POST /feedback``) as a PNG data set, recorded as a data version.

    Args:
        out: The folder to write (replaced whole): ``train/<digit>/*.png`` and the held-out ``test/<digit>/*.png``.
        url: The feedback store; default ``sqlite:///<runs_dir>/feedback.db`` (the server's default).
        holdout: The share of distinct images kept out of training, to judge a retrained model on (by image hash:
            an image stays on its side in every later export).
        tag: Record the folder as a DVC data version with this git tag (``datasets add``); none: only written.
        runs_dir: Folder of the runs (for the default store).
    """
    from mnist_dlops.feedback import export

    counts = export(url or f"sqlite:///{Path(runs_dir).resolve() / 'feedback.db'}", out, holdout)
    print(f"{counts['items']} feedback items, {counts['distinct']} distinct images: {counts['train']} in "
          f"{out}/train, {counts['test']} held out in {out}/test")
    if tag:
        add(out, tag=tag)


def main(argv: Optional[list[str]] = None) -> None:
    """``mnist-dlops datasets {add,list,verify,relabel,merge,png,feedback}``, with one-line errors."""
    command({"add": add, "list": list_versions, "verify": verify, "relabel": relabel, "merge": merge, "png": png,
             "feedback": feedback}, argv, "datasets")
