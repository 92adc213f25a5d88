"""The data fingerprint: a content hash of exactly the files the data module reads (the four IDX files, or every
PNG of the tree by relative path, size and hash), cached next to the data so that it is computed once."""

from __future__ import annotations

import hashlib
import json
import stat as stat_module
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mnist_dlops.files import allow_atomic_writes, write_atomic

CACHE_NAME = ".mnist_dlops_fingerprint.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(root: Path, files: Iterable[Path], cache: bool = True) -> str:
    """SHA-256 of the manifest of ``files`` (path relative to ``root``, size, SHA-256), in path order.

    File hashes are cached in ``root/.mnist_dlops_fingerprint.json`` by (size, mtime, ctime): a file rewritten and
    given its old mtime back (``touch -d``) still has a new ctime, which no user tool sets. A read-only folder (a
    shared copy) is simply hashed again next time, and so is one that ``cache`` is false for (a folder DVC tracks:
    a file added to it would make it a new data version).
    """
    cache_file = root / CACHE_NAME
    try:
        known_files: dict[str, Any] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known_files = {}
    manifest, fresh = [], {}
    for path in sorted(files):
        rel = path.relative_to(root).as_posix()
        info = path.stat()
        known = known_files.get(rel)
        stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
        if known and all(known.get(key) == value for key, value in stamp.items()):
            sha = known["sha256"]
        else:
            sha = file_sha256(path)
        fresh[rel] = {**stamp, "sha256": sha}
        manifest.append(f"{rel}\t{info.st_size}\t{sha}")
    # A folder without write permission (a shared, read-only copy) is left untouched, even by root.
    if cache and fresh != known_files and root.stat().st_mode & stat_module.S_IWUSR:
        try:
            allow_atomic_writes(cache_file, "the data's fingerprint cache")  # this file only: the folder is only read
            write_atomic(cache_file, json.dumps(fresh, indent=0))
        except OSError:
            pass
    return hashlib.sha256("\n".join(manifest).encode()).hexdigest()
