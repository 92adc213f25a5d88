"""What a config or a checkpoint may build: classes of the kind each slot expects, from packages the user trusts.

A config, or the hyper-parameters inside a checkpoint, is a file from anywhere. Whatever it names is imported and
then called, so a name is accepted only when

1. its top-level package is trusted: torch, Lightning, torchmetrics, Optuna, this package, plus the user's own packages
   listed in the ``MNIST_DLOPS_TRUST`` environment variable (comma-separated, e.g. ``MNIST_DLOPS_TRUST=my_pkg``).
   An environment variable, not a config key, so that a config cannot trust itself;
2. it is a class, not a function, a method or a factory (``torch.load`` and ``torch.hub.load`` would run code);
3. the class is of the kind its slot expects: a network is an ``nn.Module``, an optimizer an ``Optimizer``, a
   callback a Lightning ``Callback``, and so on.

jsonargparse imports the modules a config names while it parses, before anything is built, and importing a module
runs its top-level code: ``import_gate`` therefore looks at the raw command line and files first and refuses any
name that would import an untrusted module not imported yet. ``check_classes`` then checks every class the parsed
config (or a checkpoint's saved config) names, before anything is instantiated.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

from mnist_dlops.errors import ConfigError

TRUST_ENV = "MNIST_DLOPS_TRUST"
# The project's own dependencies that a config may name classes of (optuna: a sweep's sampler and pruner).
BUILTIN_TRUSTED = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "mnist_dlops", "optuna")
# A dotted Python name (``pkg.module.Class``): what jsonargparse would try to import.
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_INDEX = re.compile(r"\[\d+\]")


def trusted_packages() -> tuple[str, ...]:
    """The built-in trusted packages plus those the user listed in ``MNIST_DLOPS_TRUST``."""
    extra = [name.strip() for name in os.environ.get(TRUST_ENV, "").split(",") if name.strip()]
    return (*BUILTIN_TRUSTED, *extra)


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


def _untrusted_import(name: str) -> str | None:
    """The module that importing ``name`` would newly load and run from an untrusted package, if any.

    Only looks: ``find_spec`` of a module whose parent is already loaded executes nothing. A folder without
    ``__init__.py`` (a namespace package) runs no code either, so a path such as ``data.mnist`` passes.
    """
    parts = name.split(".")
    if parts[0] in trusted_packages():
        return None
    for depth in range(1, len(parts)):
        module = ".".join(parts[:depth])
        if module in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None  # nothing to import: jsonargparse reports the bad name
        if spec.origin is not None and spec.origin != "namespace":
            return module
    return None


def import_gate(tree: Any, where: str = "") -> None:
    """Refuse any dotted name in a raw config tree (a YAML file, a flag's value) that would import untrusted code."""
    for key, value in _leaves(tree, where):
        if isinstance(value, str) and _DOTTED.match(value) and (module := _untrusted_import(value)):
            top = module.split(".")[0]
            raise ConfigError(f"{key}: {value!r} is not allowed: it would import {module!r}; {_hint(top)}")


def _named(tree: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, class path or callable) a config names: ``class_path`` entries and callables already resolved."""
    for key, value in _leaves(tree, ""):
        if key.endswith("class_path") and isinstance(value, str):
            yield key[: -len(".class_path")], value
        elif callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
            yield key, value


def _resolve(key: str, path: str) -> Any:
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


def check_classes(tree: Any) -> None:
    """Refuse a config (parsed, or a checkpoint's plain dict) naming anything but a trusted class of its slot's kind.

    Keys are full config keys (``model.network``, ``trainer.callbacks[0]``); run it before instantiating anything.
    """
    kinds = _slot_kinds()
    for key, named in _named(tree):
        path = named if isinstance(named, str) else f"{named.__module__}.{named.__qualname__}"
        top = path.split(".")[0]
        if top not in trusted_packages():
            raise ConfigError(f"{key}: {path!r} is not allowed: {_hint(top)}")
        obj = _resolve(key, path) if isinstance(named, str) else named
        slot = "nested" if ".init_args." in key else _INDEX.sub("", key)
        expected = kinds.get(slot, kinds["nested"])
        names = " or ".join(f"{kind.__module__}.{kind.__qualname__}" for kind in expected)
        if not inspect.isclass(obj):
            raise ConfigError(f"{key}: {path!r} is not allowed: a config names classes ({names}), not functions")
        if not issubclass(obj, expected):
            raise ConfigError(f"{key}: {path!r} is not allowed: expected a subclass of {names}")


def gate_args(args: list[str]) -> None:
    """``import_gate`` over a command line: each ``-c``/``--config`` file or YAML string, and each flag's value."""
    import yaml

    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        name, _, value = arg.partition("=")
        if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        is_file = name in ("-c", "--config") and os.path.isfile(value)
        where = "" if name in ("-c", "--config") else name.lstrip("-").rstrip("+")
        try:
            with open(value) if is_file else nullcontext(value) as source:
                tree = yaml.safe_load(source)
        except (yaml.YAMLError, OSError):
            tree = value  # malformed YAML: the parser reports it, naming the file
        try:
            import_gate(tree, where)
        except ConfigError as err:
            raise ConfigError(f"{value}: {err}" if is_file else str(err)) from None
