"""The libraries' private members the package still uses, each with its reason written where it is used.

If a pinned library renames or drops one, the test names it here, before a run breaks somewhere deep; and a new
use of a private member that is not listed here fails too, so that none slips in without a reason and a guard.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mnist_dlops"

# (class, member, its parameters when it is a method we call or override) -> why no public way does it.
PRIVATE = {
    # ModelCheckpoint has no public "save last.ckpt now": refreshing it mid-epoch and on SIGTERM needs these.
    ("pytorch_lightning.callbacks.ModelCheckpoint", "_save_checkpoint"): ["self", "trainer", "filepath"],
    ("pytorch_lightning.callbacks.ModelCheckpoint", "_save_last_checkpoint"): ["self", "trainer", "monitor_candidates"],
    ("pytorch_lightning.callbacks.ModelCheckpoint", "_should_skip_saving_checkpoint"): ["self", "trainer"],
    ("pytorch_lightning.callbacks.ModelCheckpoint", "_monitor_candidates"): ["self", "trainer"],
    ("pytorch_lightning.callbacks.ModelCheckpoint", "_last_global_step_saved"): None,
    # LightningCLI builds the Trainer here, with the callbacks list; its public instantiate_trainer cannot drop one.
    ("pytorch_lightning.cli.LightningCLI", "_instantiate_trainer"): ["self", "config", "callbacks"],
    # LightningCLI restores a checkpoint's hyper-parameters there, over the user's flags: ours does it before parsing.
    ("pytorch_lightning.cli.LightningCLI", "_parse_ckpt_path"): ["self"],
    # Lightning's CSV writer deletes an existing metrics.csv here and rewrites it in place here.
    ("pytorch_lightning.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists"): ["self"],
    ("pytorch_lightning.loggers.csv_logs.ExperimentWriter", "_rewrite_with_new_header"): ["self", "fieldnames"],
    ("pytorch_lightning.loggers.CSVLogger", "_experiment"): None,
    # SummaryWriter's public add_hparams writes a run of its own; the HParams tab and the restart marker need the
    # run's own event file.
    ("torch.utils.tensorboard.SummaryWriter", "_get_file_writer"): ["self"],
    # W&B's run arguments and run: the mode and id are decided when the run starts, offline when unreachable.
    ("pytorch_lightning.loggers.WandbLogger", "_wandb_init"): None,
    ("pytorch_lightning.loggers.WandbLogger", "_experiment"): None,
    ("pytorch_lightning.loggers.WandbLogger", "_save_dir"): None,
}


def instance(path: str, folder: Path) -> object:
    """The class, or an instance of it for members set in ``__init__`` (loggers writing nothing until used)."""
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if name in ("ExperimentWriter", "LightningCLI", "SummaryWriter"):
        return cls
    return cls(save_dir=str(folder)) if name == "CSVLogger" else cls()


@pytest.mark.parametrize(("where", "member"), sorted(PRIVATE), ids=lambda v: v if isinstance(v, str) else None)
def test_the_pinned_libraries_still_have_them(where: str, member: str, tmp_path: Path) -> None:
    obj = instance(where, tmp_path)
    assert hasattr(obj, member), f"{where}.{member} is gone: find its public replacement (see its use in mnist_dlops)"
    params = PRIVATE[(where, member)]
    if params is not None:
        assert list(inspect.signature(getattr(obj, member)).parameters)[: len(params)] in (params, params[1:]), (
            f"{where}.{member} changed its signature")


def test_argv_reads_negative_numbers_as_argparse_does() -> None:
    """argv.py copies argparse's private pattern for 'a negative number, not an option'."""
    from mnist_dlops.cli import argv

    assert argv._NEGATIVE_NUMBER.pattern == argparse.ArgumentParser()._negative_number_matcher.pattern


def third_party_privates() -> set[tuple[str, str]]:
    """Every (library class, private member) our classes reach through ``self``/``super()``, found in the source."""
    found = set()
    for file in PACKAGE.rglob("*.py"):
        module = importlib.import_module(".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts))
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            source = inspect.getsource(cls)
            used = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)|def (_[a-z]\w*)", source))
            used = {name for pair in used for name in pair if name}
            for base in cls.__mro__[1:]:
                if base.__module__.startswith("mnist_dlops") or base is object:
                    continue
                for name in (used & set(dir(base))) | (used & set(_init_names(base))):
                    found.add((f"{base.__module__}.{base.__qualname__}", name))
    return found


def _init_names(base: type) -> dict[str, None]:
    """Attributes a library class sets on ``self`` in its ``__init__`` (not visible on the class)."""
    try:
        source = inspect.getsource(base.__init__)
    except (TypeError, OSError):
        return {}
    return dict.fromkeys(re.findall(r"self\.(_[a-z]\w*)\s*(?::[^=]*)?=", source))


def test_no_unlisted_private_member_is_used() -> None:
    listed = {member for _, member in PRIVATE}
    unlisted = sorted((where, name) for where, name in third_party_privates() if name not in listed)
    assert not unlisted, f"private members used without a reason and a guard here: {unlisted}"


def test_every_private_attribute_access_is_ours_or_listed() -> None:
    """The issue's grep, in code: every ``x._name`` outside strings and comments names a member this package
    defines, or one listed above."""
    import io
    import tokenize

    ours, reached = set(), {}
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        ours |= set(re.findall(r"def (_[a-z]\w*)", text))
        for line in text.splitlines():  # self._x = ..., self._a, self._b = ..., self._x: T = ...
            target, eq, _ = line.partition(" = ")
            ours |= set(re.findall(r"self\.(_[a-z]\w*)", target)) if eq else set()
        ours |= set(re.findall(r"^(_[A-Za-z]\w*)\s*[:=]", text, re.M)) | set(re.findall(r"^class (_\w+)", text, re.M))
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        for before, dot, name in zip(tokens, tokens[1:], tokens[2:]):
            if dot.string == "." and name.type == tokenize.NAME and re.fullmatch(r"_[a-z]\w*", name.string):
                reached.setdefault(name.string, file.relative_to(PACKAGE.parent).as_posix())
    listed = {member for _, member in PRIVATE} | {"_negative_number_matcher"}
    unknown = {name: where for name, where in reached.items() if name not in ours | listed}
    assert not unknown, f"private members of other packages, without a reason and a guard: {unknown}"


def test_dvc_still_raises_the_error_versions_catches() -> None:
    """data/versions.py catches dvc-data's error for a folder listing that is nowhere (an internal module)."""
    from dvc_data.index.index import DataIndexDirError

    assert issubclass(DataIndexDirError, Exception)
