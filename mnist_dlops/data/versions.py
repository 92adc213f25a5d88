"""Data versions on DVC: which version a data folder is, and reading another version without checking it out."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mnist_dlops.errors import DataError, UserError, invoked
from mnist_dlops.writeguard import allow_writes

# Where read_version keeps the versions it has read, by DVC hash, inside the DVC repository (git-ignored by DVC).
VERSIONS_DIR = Path(".dvc") / "tmp" / "mnist_dlops-versions"


@dataclass
class DataVersion:
    """One version of a tracked data folder, as a run records it."""

    path: str  # the tracked folder, relative to the repository root
    md5: str  # DVC's hash of the folder (``<md5>.dir``)
    rev: str  # the revision asked for (a tag, branch or commit), or ``workspace``
    commit: Optional[str] = None  # the git commit of the pointer file at that revision; None: not committed yet
    tags: list[str] = field(default_factory=list)  # git tags on that commit
    nfiles: Optional[int] = None
    size: Optional[int] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        name = self.tags[0] if self.tags else (self.commit or "uncommitted")[:10]
        return f"{self.path}@{name} ({self.md5[:12]})"


def version_label(version: Optional[dict[str, Any]]) -> str:
    """A data version in a few characters, for tables: its tag, else its pointer's commit, and DVC's hash."""
    if not version:
        return ""
    name = (version.get("tags") or [None])[0] or (version.get("commit") or "uncommitted")[:8]
    return f"{name}:{str(version.get('md5', ''))[:8]}"


def repo_root(path: Path) -> Optional[Path]:
    """The DVC repository (a folder holding ``.dvc/`` and ``.git``) that ``path`` lies in, if any."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir() and (folder / ".git").exists():
            return folder
    return None


def _dvc_writes(root: Path) -> None:
    """DVC writes its state, locks and read versions under ``.dvc/`` and its site cache: let it."""
    from dvc.dirs import site_cache_dir

    allow_writes(root / ".dvc", "DVC's cache")
    allow_writes(site_cache_dir(), "DVC's cache")


class DvcError(UserError):
    """A DVC or git step that failed: the message names the command and DVC's own first line."""


def run_command(root: Path, *command: str, check: bool = True) -> str:
    """A git or dvc command in ``root``, its output; its failure a DvcError naming the command and its first error
    line (``check``), or "" (not ``check``)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    if result.returncode and check:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        first = next((line for line in lines if "ERROR" in line or "error" in line.lower()), lines[0] if lines else "")
        raise DvcError(f"{' '.join(command)}: {first.strip()[:300]}")
    return "" if result.returncode else result.stdout


def _commit_and_tags(root: Path, rev: str, pointer: str) -> tuple[Optional[str], list[str]]:
    """The last commit (at ``rev``) that changed ``pointer``, and the tags on it."""
    commit = run_command(root, "git", "log", "-1", "--format=%H", rev, "--", pointer, check=False).strip() or None
    tags = run_command(root, "git", "tag", "--points-at", commit, check=False).split() if commit else []
    return commit, tags


def _pointer(root: Path, rel: str) -> Optional[dict[str, Any]]:
    """The ``outs`` entry of ``<rel>.dvc`` in the working tree, if the folder is tracked by one."""
    file = root / f"{rel}.dvc"
    if not file.is_file():
        return None
    outs = (yaml.safe_load(file.read_text()) or {}).get("outs") or []
    return outs[0] if outs else None


def workspace_version(data_dir: Path) -> Optional[DataVersion]:
    """The version of ``data_dir`` as it is on disk; None if DVC does not track it. A copy modified, or partly
    deleted, since its last ``dvc add`` is a DataError naming it and what to run."""
    root = repo_root(data_dir)
    if root is None:
        return None
    rel = Path(os.path.relpath(data_dir.resolve(), root)).as_posix()
    out = _pointer(root, rel)
    if out is None:
        return None
    from dvc.repo import Repo

    _dvc_writes(root)
    with Repo(str(root)) as repo:
        # DVC's `status`: the folder against its pointer. When the cache lacks the version it says only "not in
        # cache"; `data status` then tells a modified copy from an intact one.
        states = [state for entry in repo.status(targets=[f"{rel}.dvc"]).get(f"{rel}.dvc", [])
                  if isinstance(entry, dict) for state in (entry.get("changed outs") or {}).values()]
        changed = sorted(state for state in states if state != "not in cache")
        if "not in cache" in states:
            changes = repo.data_status(targets=[rel]).get("uncommitted") or {}
            changed += sorted({*changes.get("modified", []), *changes.get("deleted", []), *changes.get("added", [])})
    if changed:
        raise DataError(
            f"{data_dir}: differs from its DVC version {out['md5'][:12]} ({rel}.dvc; {', '.join(changed[:3])}); "
            f"record it as a new version ({invoked('datasets add')} {rel}) or restore it (dvc checkout {rel}.dvc)"
        )
    commit, tags = _commit_and_tags(root, "HEAD", f"{rel}.dvc")
    if commit and run_command(root, "git", "status", "--porcelain", "--", f"{rel}.dvc", check=False).strip():
        commit, tags = None, []  # the pointer changed since its last commit: a version not committed yet
    return DataVersion(rel, out["md5"], "workspace", commit, tags, out.get("nfiles"), out.get("size"))


def _missing_bytes(rev: str, rel: str, what: str) -> DataError:
    return DataError(f"data.version={rev}: the bytes of {rel} ({what}) are in neither the DVC cache nor a reachable "
                     "remote; run dvc pull from a remote that has them, or dvc push from a clone that has them")


def read_version(data_dir: Path, rev: str) -> tuple[Path, DataVersion]:
    """The folder holding ``data_dir`` as it was at git revision ``rev`` (read through DVC, cached by hash), and
    that version. The working copy is neither read nor changed."""
    from dvc.api import DVCFileSystem
    from dvc.scm import RevError

    # internal: what DVCFileSystem raises for a folder listing in neither cache nor remote (no public name for it;
    # guarded by tests/test_private_members.py)
    from dvc_data.index.index import DataIndexDirError

    root = repo_root(data_dir)
    if root is None:
        raise DataError(f"data.version={rev}: {data_dir} is not inside a DVC repository (git init && dvc init, then "
                        f"{invoked('datasets add')} {data_dir})")
    rel = Path(os.path.relpath(data_dir.resolve(), root)).as_posix()
    if not rev.strip() or rev.startswith("-"):  # git would read "-..." as an option of its own
        raise DataError(f"data.version={rev!r}: not a git revision (a tag, a branch or a commit)")
    _dvc_writes(root)
    try:
        fs = DVCFileSystem(str(root), rev=rev)
        info = fs.info(rel)
    except RevError:
        raise DataError(f"data.version={rev}: no such git revision in {root} "
                        f"({invoked('datasets list')} {rel} lists the versions)") from None
    except FileNotFoundError:
        raise DataError(f"data.version={rev}: {rel} does not exist at that revision") from None
    except DataIndexDirError:  # the folder's listing itself is in neither the cache nor the remote
        raise _missing_bytes(rev, rel, "its listing") from None
    md5 = info.get("md5")  # DVC's hash: only a folder DVC tracks has one
    if not md5:
        raise DataError(f"data.version={rev}: {rel} is not tracked by DVC at that revision (no {rel}.dvc)")
    target = root / VERSIONS_DIR / md5.removesuffix(".dir")
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".incoming-"))
        try:
            fs.get(rel, str(staging / "data"), recursive=True)
            got = sum(file.stat().st_size for file in (staging / "data").rglob("*") if file.is_file())
            if got != info.get("size"):  # DVC lists nothing at a commit without its set-up: never train on less
                raise DataError(f"data.version={rev}: DVC read {got} of the {info.get('size')} bytes of {rel}: was "
                                "DVC's set-up (.dvc/config) committed at that revision? (git log -- .dvc/config)")
            os.replace(staging / "data", target)  # whole or not at all: a read cut short leaves no version
        except (OSError, DataIndexDirError):
            raise _missing_bytes(rev, rel, md5[:12]) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    commit, tags = _commit_and_tags(root, rev, f"{rel}.dvc")
    nfiles = sum(1 for file in target.rglob("*") if file.is_file())
    return target, DataVersion(rel, md5, rev, commit, tags, nfiles, info.get("size"))
