"""Provenance: which data, which code, which machine produced a run.

- ``data_fingerprint``: a content hash of exactly the files the data module reads (the four IDX files, or every
  PNG of the tree by relative path, size and hash), cached next to the data so that it is computed once.
- ``code_version``: the git commit of the code that ran, whether the tree was dirty, and the diff when it was.
- ``environment``: the command line, the versions that matter, and the hardware.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat as stat_module
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

CACHE_NAME = ".mnist_dlops_fingerprint.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(root: Path, files: Iterable[Path]) -> str:
    """SHA-256 of the manifest of ``files`` (path relative to ``root``, size, SHA-256), in path order.

    File hashes are cached in ``root/.mnist_dlops_fingerprint.json`` by (size, mtime); a read-only folder (a shared
    copy) is simply hashed again next time.
    """
    cache_file = root / CACHE_NAME
    try:
        cache: dict[str, Any] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    manifest, fresh = [], {}
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        info = path.stat()
        known = cache.get(rel)
        if known and known["size"] == info.st_size and known["mtime_ns"] == info.st_mtime_ns:
            sha = known["sha256"]
        else:
            sha = file_sha256(path)
        fresh[rel] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha}
        manifest.append(f"{rel}\t{info.st_size}\t{sha}")
    # A folder without write permission (a shared, read-only copy) is left untouched, even by root.
    if fresh != cache and root.stat().st_mode & stat_module.S_IWUSR:
        try:
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh, indent=0))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return hashlib.sha256("\n".join(manifest).encode()).hexdigest()


def _git(args: list[str], cwd: Path) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version(code_dir: Path) -> tuple[dict[str, Any], Optional[str]]:
    """``({commit, dirty, repo} or {commit: "no git"}, diff or None)`` of the git work tree holding ``code_dir``."""
    top = _git(["rev-parse", "--show-toplevel"], code_dir)
    if top is None:
        return {"commit": "no git", "dirty": None, "repo": None}, None
    repo = Path(top.strip())
    commit = (_git(["rev-parse", "HEAD"], repo) or "no commit").strip()
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo) or ""
    dirty = bool(status.strip())
    diff = _git(["diff", "HEAD"], repo) if dirty else None
    return {"commit": commit, "dirty": dirty, "repo": str(repo)}, diff


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Command line, versions and hardware of this process."""
    import lightning_fabric
    import pytorch_lightning
    import torch
    import torchmetrics

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "pytorch_lightning": str(pytorch_lightning.__version__),
            "lightning_fabric": str(lightning_fabric.__version__),
            "torchmetrics": str(torchmetrics.__version__),
        },
        "hardware": {
            "cpu": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "gpus": gpus,
            "os": platform.platform(),
        },
    }


def run_fingerprint(run_dir: Path) -> Optional[str]:
    """The data fingerprint a training run recorded in its ``provenance.yaml``; None if it has no readable record."""
    import yaml

    try:
        record = yaml.safe_load((run_dir / "provenance.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return ((record or {}).get("data") or {}).get("fingerprint") if isinstance(record, dict) else None
