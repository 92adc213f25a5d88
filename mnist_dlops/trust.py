"""What a config or a checkpoint may build: classes of the kind each slot expects, from packages the user trusts."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterable, Iterator
from typing import Any, Optional

from mnist_dlops.errors import ConfigError
from mnist_dlops.importguard import TRUST_ENV, user_trusted

# The project's own dependencies that a config may name classes of (optuna: a sweep's sampler and pruner).
BUILTIN_TRUSTED = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "mnist_dlops", "optuna")
_INDEX = re.compile(r"\[\d+\]")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # pkg.module.Class


def trusted_packages() -> tuple[str, ...]:
    """The built-in trusted packages plus those the user listed in ``MNIST_DLOPS_TRUST``."""
    return (*BUILTIN_TRUSTED, *user_trusted())


def _hint(top: str) -> str:
    return f"trusted packages are {', '.join(trusted_packages())}; if {top!r} is your own code, run with {TRUST_ENV}={top}"


def _slot_kinds() -> dict[str, tuple[type, ...]]:
    """The base classes each config slot accepts (imported here: they are the libraries' own)."""
    import pytorch_lightning.plugins as plugins
    from lightning_fabric.plugins.environments import ClusterEnvironment
    from pytorch_lightning import Callback
    from pytorch_lightning.accelerators import Accelerator
    from pytorch_lightning.loggers import Logger
    from pytorch_lightning.profilers import Profiler
    from pytorch_lightning.strategies import Strategy
    from torch import nn
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    kinds = {
        "model.network": (nn.Module,),
        "model.optimizer": (Optimizer,),
        "model.lr_scheduler": (LRScheduler, ReduceLROnPlateau),
        "trainer.callbacks": (Callback,),
        "trainer.logger": (Logger,),
        "trainer.strategy": (Strategy,),
        "trainer.accelerator": (Accelerator,),
        "trainer.profiler": (Profiler,),
        "trainer.plugins": (plugins.Precision, plugins.CheckpointIO, ClusterEnvironment, plugins.LayerSync),
    }
    # Arguments nested inside one of those classes (``init_args`` of a callback, say) take any of these kinds.
    kinds["nested"] = tuple(dict.fromkeys(kind for group in kinds.values() for kind in group))
    return kinds


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """Every (dotted config key, leaf value) in a tree of dicts, lists and jsonargparse Namespaces."""
    if hasattr(value, "items") and not isinstance(value, str):
        for sub_key, sub_value in value.items():
            yield from _leaves(sub_value, f"{key}.{sub_key}" if key else str(sub_key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{key}[{i}]")
    else:
        yield key, value


def _named(tree: Any, slots: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Every (key, class path or callable) a config names: ``class_path`` entries, a slot's value given as a plain
    dotted name (``network: pkg.Net``, which the parser resolves as a class path too), and resolved callables."""
    for key, value in _leaves(tree, ""):
        if key.endswith("class_path") and isinstance(value, str):
            yield key[: -len(".class_path")], value
        elif isinstance(value, str) and _INDEX.sub("", key) in slots and _DOTTED.fullmatch(value):
            yield key, value
        elif callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
            yield key, value


def resolve(key: str, path: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes (``pkg.Class.method``)."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:depth]))
        except ImportError:
            continue
        try:
            for name in parts[depth:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"{key}: {path!r} cannot be imported")


def check_classes(tree: Any, kinds: Optional[dict[str, tuple[type, ...]]] = None) -> None:
    """Refuse a config (parsed, or a checkpoint's plain dict) naming anything but a trusted class of its slot's kind.

    Keys are full config keys (``model.network``, ``trainer.callbacks[0]``); run it before instantiating anything.
    ``kinds``: slot -> the base classes it takes (default: the run config's slots; ``nested`` for ``init_args``).
    """
    kinds = kinds or _slot_kinds()
    for key, named in _named(tree, kinds):
        path = named if isinstance(named, str) else f"{named.__module__}.{named.__qualname__}"
        top = path.split(".")[0]
        if top not in trusted_packages():
            raise ConfigError(f"{key}: {path!r} is not allowed: {_hint(top)}")
        obj = resolve(key, path) if isinstance(named, str) else named
        slot = "nested" if ".init_args." in key else _INDEX.sub("", key)
        expected = kinds.get(slot, kinds["nested"])
        names = " or ".join(f"{kind.__module__}.{kind.__qualname__}" for kind in expected)
        if not inspect.isclass(obj):
            raise ConfigError(f"{key}: {path!r} is not allowed: a config names classes ({names}), not functions")
        if not issubclass(obj, expected):
            raise ConfigError(f"{key}: {path!r} is not allowed: expected a subclass of {names}")


# The database dialects and drivers this project ships (SQLAlchemy imports a URL's driver by module name).
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")
# An MLflow store may also be a tracking server or a local folder.
TRACKING_SCHEMES = (*DATABASE_SCHEMES, "http", "https", "file")


def engine_url(url: str) -> str:
    """The URL SQLAlchemy should open: a bare ``postgresql://`` names the psycopg2 driver this project ships
    (SQLAlchemy's own default for it is psycopg 3)."""
    return url.replace("postgresql://", "postgresql+psycopg2://", 1) if url.startswith("postgresql://") else url


def redact(url: str) -> str:
    """``url`` with the password of ``scheme://user:password@host`` hidden, for messages."""
    # Not sqlalchemy's make_url(...).render_as_string(hide_password=True): this also hides a URL inside a driver's
    # free-text error message, which make_url cannot parse.
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def check_url(key: str, url: str, schemes: tuple[str, ...] = DATABASE_SCHEMES) -> str:
    """``url`` if its scheme is one of ``schemes``; else a ``ConfigError`` naming the key (password hidden)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite" and url.split("://", 1)[1].lstrip("/") in ("", ":memory:"):
        raise ConfigError(f"{key}={url}: an in-memory database keeps nothing; give a file, sqlite:///path/file.db")
    if scheme in schemes or (not scheme and "file" in schemes):  # no scheme: a local folder
        return url
    raise ConfigError(
        f"{key}={redact(url)}: not a supported store; use one of {', '.join(s + '://' for s in schemes)}"
        " (e.g. sqlite:///path/file.db or postgresql://user@host/db)"
    )
