"""The write gate: while a command runs, no file is created, changed, removed or renamed outside the places that
command writes by design (an audit hook, PEP 578; docs/security.md says why there)."""

from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

# event: (what it does, ((index of a path it changes, index of that path's dir_fd or None), ...), follows links)
_EVENTS: dict[str, tuple[str, tuple[tuple[int, Optional[int]], ...], bool]] = {
    "open": ("write", ((0, None),), True),
    "os.remove": ("delete", ((0, 1),), False),
    "os.rmdir": ("delete", ((0, 1),), False),
    "shutil.rmtree": ("delete", ((0, 1),), False),
    "os.rename": ("rename", ((0, 2), (1, 3)), False),  # os.replace raises it too
    "os.mkdir": ("create", ((0, 2),), False),
    "os.symlink": ("link", ((1, 2),), False),
    "os.link": ("link", ((1, 3),), False),
    "os.truncate": ("truncate", ((0, None),), True),
    "os.chmod": ("change", ((0, 2),), True),
    "os.chown": ("change", ((0, 3),), True),
    "os.mkfifo": ("create", ((0, 2),), False),
    "os.mknod": ("create", ((0, 3),), False),
    "sqlite3.connect": ("open the database", ((0, None),), True),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Libraries that keep settings under ~/.config (matplotlib's font list, W&B's and DVC's settings).
_CONFIG_DIRS = ("matplotlib", "wandb", "dvc", "neptune")


class WriteRefused(PermissionError):
    """A write the gate refused; a ``PermissionError``, so a library treats it as a folder it may not write."""

    exit_code = 2

    def __init__(self, message: str, path: str) -> None:
        super().__init__(13, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class _Scope:
    """One ``guarded_writes`` block: the folders it may write, and the config values that name paths."""

    allowed: list[tuple[str, str]] = field(default_factory=list)  # (resolved folder or file, why it may be written)
    sources: list[tuple[str, str]] = field(default_factory=list)  # (resolved path, "key=value" that named it)
    values: dict[str, str] = field(default_factory=dict)  # config key -> its string value
    built: dict[str, str] = field(default_factory=dict)  # class path -> the config key that builds it


def _resolve(path: Any, dir_fd: Any, follow: bool) -> Optional[str]:
    """The absolute, link-free path a call acts on; None for an open descriptor or an in-memory database."""
    if isinstance(path, int) or path is None:
        return None  # a descriptor: checked when it was opened
    path = os.fsdecode(path)
    if path in ("", ":memory:") or path.startswith("file::memory:"):
        return None
    if path.startswith("file:"):  # an SQLite URI
        path = path[5:].split("?", 1)[0]
    if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
        try:  # shutil.rmtree walks a tree by descriptors: the folder each one names
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        except OSError:
            pass
    path = os.path.abspath(path)
    if follow:
        return os.path.realpath(path)
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _base_allowed() -> list[tuple[str, str]]:
    """What every command may write: the temp folder, the libraries' caches and settings, devices."""
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    places = [(tempfile.gettempdir(), "the temp folder"), (cache, "the libraries' cache"),
              (os.devnull, "the null device"), ("/dev/shm", "shared memory")]  # DataLoader workers share tensors there
    places += [(os.path.join(config, name), f"{name}'s settings") for name in _CONFIG_DIRS]
    places += [(os.environ[name], name) for name in ("MPLCONFIGDIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                     "WANDB_DATA_DIR") if os.environ.get(name)]
    return [(os.path.realpath(place), why) for place, why in places]


class WriteGate:
    """An audit hook that refuses writes outside the allowed places while a ``guarded_writes`` block is active."""

    def __init__(self) -> None:
        self.scopes: list[_Scope] = []  # the active blocks, outermost first; the gate acts while there is one
        self.refused: list[str] = []  # what it refused in the outermost block, oldest first
        self._base: list[tuple[str, str]] = []
        self._busy = threading.local()
        self._hooked = False

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.scopes or event not in _EVENTS or getattr(self._busy, "on", False):
            return
        verb, paths, follow = _EVENTS[event]
        if event == "open":
            mode, flags = args[1], args[2]
            writes = set(mode) & set("wax+") if isinstance(mode, str) else flags & _WRITE_FLAGS
            if not writes:
                return
        self._busy.on = True
        try:
            for index, fd_index in paths:
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                where = _resolve(args[index], dir_fd, follow)
                if where is not None and not self.allowed(where, event):
                    self._refuse(verb, where)
        finally:
            self._busy.on = False

    def allowed(self, path: str, event: str = "open") -> bool:
        """Whether ``path`` (resolved) may be written in the active blocks."""
        places = [*self._base, *(place for scope in self.scopes for place in scope.allowed)]
        if event == "os.mkdir" and (os.path.isdir(path) or any(_under(root, path) for root, _ in places)):
            return True  # a folder that is there (mkdir exist_ok), or one on the way to a place that may be written
        head, name = os.path.split(path)
        if os.path.basename(head) == "__pycache__" and ".pyc" in name:
            return True  # Python's bytecode cache
        return any(_under(path, root) for root, _ in places)

    def _source(self, path: str) -> Optional[str]:
        """The config key that asked for ``path``: the one whose value is the path or a folder above it, else the
        key of the config-built object (a callback, a logger) writing it, with its values that hold a folder."""
        named = max((s for scope in self.scopes for s in scope.sources if _under(path, s[0])),
                    key=lambda s: len(s[0]), default=None)
        if named:
            return named[1]
        frame = inspect.currentframe()
        while frame is not None:
            writer = frame.f_locals.get("self")
            kind = f"{type(writer).__module__}.{type(writer).__qualname__}"
            for scope in reversed(self.scopes):
                if kind in scope.built:
                    key = scope.built[kind]
                    values = [f"{k}={v}" for k, v in scope.values.items()
                              if k.startswith(key + ".") and re.search(r"(dir|path|file|name)$", k) and "/" in v]
                    return ", ".join(values) or f"{key} ({kind})"
            frame = frame.f_back
        return None

    def _refuse(self, verb: str, path: str) -> None:
        source = self._source(path)
        run = next((root for scope in reversed(self.scopes) for root, why in scope.allowed if why == "the run"), None)
        where = f"the run {os.path.relpath(run)}" if run else "the places this command writes"
        message = (f"{source + ': ' if source else ''}refused to {verb} {path}: outside {where} "
                   "(a command writes only in its run, its stores and the outputs you name)")
        self.refused.append(message)
        raise WriteRefused(message, path)

    def allow(self, path: str | os.PathLike, why: str) -> None:
        """Let the innermost active block write under ``path`` (a folder or a file); nothing when none is active."""
        if self.scopes:
            self.scopes[-1].allowed.append((os.path.realpath(path), why))

    @contextmanager
    def allowing(self, path: str | os.PathLike, why: str) -> Iterator[None]:
        """``allow`` for the length of a block only."""
        self.allow(path, why)
        try:
            yield
        finally:
            if self.scopes and (os.path.realpath(path), why) in self.scopes[-1].allowed:
                self.scopes[-1].allowed.remove((os.path.realpath(path), why))

    def note_sources(self, tree: Any, key: str = "", built: Optional[dict[str, str]] = None) -> None:
        """Remember which config key names which path, and which key builds which class, for a refusal's line
        (``trainer.callbacks[1].init_args.dirpath=...``); ``built`` adds classes the config does not name."""
        if not self.scopes:
            return
        scope = self.scopes[-1]
        scope.built.update(built or {})
        if hasattr(tree, "items") and not isinstance(tree, str):
            for sub_key, value in tree.items():
                self.note_sources(value, f"{key}.{sub_key}" if key else str(sub_key))
        elif isinstance(tree, (list, tuple)):
            for i, item in enumerate(tree):
                self.note_sources(item, f"{key}[{i}]")
        elif isinstance(tree, (str, os.PathLike)) and str(tree) not in ("", "."):
            scope.values[key] = str(tree)
            if key.endswith(".class_path"):  # by the class's own module: a config may name it by a shorter path
                module, _, name = str(tree).rpartition(".")
                kind = getattr(sys.modules.get(module), name, None)
                path = f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind, type) else str(tree)
                scope.built[path] = key.removesuffix(".class_path")
            resolved = _resolve(tree, None, False)
            if resolved and resolved != os.getcwd():
                scope.sources.append((resolved, f"{key}={tree}"))


GATE = WriteGate()


@contextmanager
def guarded_writes() -> Iterator[WriteGate]:
    """Within this block, writes go only where ``allow_writes`` (or the base places) let them (see the module's doc).

    Blocks nest: an inner block (one run of a sweep) adds its own places and gives them back when it ends."""
    if not GATE._hooked:
        sys.addaudithook(GATE.hook)  # for the life of the process (audit hooks cannot be removed); idle outside blocks
        GATE._hooked = True
    if not GATE.scopes:
        GATE.refused.clear()
        GATE._base = _base_allowed()
    GATE.scopes.append(_Scope())
    try:
        yield GATE
    finally:
        GATE.scopes.pop()


def allow_writes(path: str | os.PathLike, why: str) -> None:
    """Let the command that is running write under ``path``; ``why`` names it (``the run``, ``--out``...)."""
    GATE.allow(path, why)
