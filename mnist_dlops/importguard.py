"""The import gate: while a command runs, no module loads unless it is installed or trusted by name (a finder at
the front of ``sys.meta_path``; docs/security.md says why there)."""

from __future__ import annotations

import importlib.abc
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from typing import Any

TRUST_ENV = "MNIST_DLOPS_TRUST"
# Standard-library modules whose import alone acts (opens a browser, prints, starts a demo): never a config's to load.
STDLIB_SIDE_EFFECTS = frozenset({"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtledemo"})


def user_trusted() -> tuple[str, ...]:
    """The top-level packages listed in ``MNIST_DLOPS_TRUST`` (comma-separated)."""
    return tuple(name.strip() for name in os.environ.get(TRUST_ENV, "").split(",") if name.strip())


def installed_roots() -> tuple[str, ...]:
    """The folders whose modules count as installed: the standard library, site-packages, and this package."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.update(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        roots.add(site.getusersitepackages())
    roots.add(os.path.dirname(os.path.abspath(__file__)))  # mnist_dlops itself, also when installed editable
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots)


class UntrustedImport(ImportError):
    """An import the gate refused; an ``ImportError``, so code that tolerates a missing module goes on without it."""


class ImportGate(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that refuses modules from outside the installed and trusted folders while active."""

    def __init__(self) -> None:
        self.depth = 0  # nested guarded_imports() calls; the gate acts while > 0, in every thread
        self.refused: list[str] = []  # what it refused, newest last: the CLI names it in its error line
        self._looking = threading.local()
        self._roots: tuple[str, ...] = ()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if self.depth == 0 or getattr(self._looking, "busy", False):
            return None
        self._looking.busy = True
        try:
            spec = self._spec_from_others(fullname, path, target)
        finally:
            self._looking.busy = False
        if spec is None or self.allowed(fullname, spec):
            return spec
        message = (
            f"refused to import {fullname!r} ({spec.origin}): neither installed nor trusted; if it is your own code, "
            f"run with {TRUST_ENV}={fullname.split('.')[0]}"
        )
        self.refused.append(message)
        raise UntrustedImport(message, name=fullname)

    def reset(self) -> None:
        """Forget earlier refusals and read the installed folders again (a test may change ``sys.path``)."""
        self.refused.clear()
        self._roots = installed_roots()

    def _spec_from_others(self, fullname: str, path: Any, target: Any) -> ModuleSpec | None:
        """The spec the rest of ``sys.meta_path`` finds: what Python would load without the gate."""
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def allowed(self, fullname: str, spec: ModuleSpec) -> bool:
        """Whether the module ``spec`` describes may load."""
        top = fullname.split(".")[0]
        if top in STDLIB_SIDE_EFFECTS:
            return False
        if top in user_trusted():
            return True
        origin = spec.origin
        if origin is None or origin in ("built-in", "frozen") or not spec.has_location:
            return True  # compiled into Python, or a namespace package (a folder: it runs no code)
        return os.path.realpath(origin).startswith(self._roots)


GATE = ImportGate()


@contextmanager
def guarded_imports() -> Iterator[ImportGate]:
    """Within this block no module loads from outside the installed and trusted folders (see the module's doc)."""
    if GATE not in sys.meta_path:
        sys.meta_path.insert(0, GATE)
    if GATE.depth == 0:
        GATE.reset()
    GATE.depth += 1
    try:
        yield GATE
    finally:
        GATE.depth -= 1
