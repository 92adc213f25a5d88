"""The one reader of a raw command line, token for token as argparse reads it, for what must look before the
parser does: ``--ckpt_path`` restore, the config-file check and the sweep's split of its options from the trials'."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

# Not parse_known_args: jsonargparse refuses it (NotImplementedError), and argparse's cannot tell the sweep's nested
# options (--sampler.init_args.seed) from the trials' without knowing every name. tests/test_argv.py pins the parity.
# argparse's test for "a negative number, not an option" (ArgumentParser._negative_number_matcher).
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
SHORT = {"-c": "config", "-h": "help"}
NO_VALUE = frozenset({"help"})


@dataclass(frozen=True)
class Option:
    """One option as written: its name (no dashes, no ``+``), its value, and the slice of argv it spans."""

    name: str
    value: Optional[str]
    start: int
    end: int


def is_option(arg: str) -> bool:
    """Whether argparse reads ``arg`` as an option rather than a value (its ``_parse_optional``: a lone ``-``, a
    negative number and a word with a space before any ``=`` are values)."""
    return (arg.startswith("-") and arg != "-" and not _NEGATIVE_NUMBER.match(arg)
            and " " not in arg.split("=", 1)[0])


def options(args: Sequence[str]) -> list[Option]:
    """Every option in ``args``, in order; positionals (a subcommand) are skipped and ``--`` ends the options."""
    found, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if not is_option(arg):
            i += 1
            continue
        if arg.startswith("--") or "=" in arg:
            flag, eq, joined = arg.partition("=")
        else:  # -cfile: a short option with its value attached
            flag, joined = arg[:2], arg[2:]
            eq = "=" if joined else ""
        name = SHORT.get(flag, flag.lstrip("-")).removesuffix("+")
        if eq or name in NO_VALUE:
            found.append(Option(name, joined if eq else None, i, i + 1))
            i += 1
            continue
        takes = i + 1 < len(args) and not is_option(args[i + 1])
        found.append(Option(name, args[i + 1] if takes else None, i, i + 1 + takes))
        i += 1 + takes
    return found


def last(args: Sequence[str], name: str) -> Optional[Option]:
    """The last ``--name`` in ``args`` (argparse keeps the last of a repeated option), or None."""
    return next((o for o in reversed(options(args)) if o.name == name), None)


def config_files(args: Sequence[str]) -> list[str]:
    """The values of every ``-c``/``--config``, in order (each may be a file or an inline YAML string)."""
    return [o.value for o in options(args) if o.name == "config" and o.value is not None]


def subcommand(args: Sequence[str], names: Iterable[str]) -> Optional[int]:
    """The index of the first positional in ``args`` that is one of ``names`` (not an option's value)."""
    taken = {i for o in options(args) for i in range(o.start, o.end)}
    return next((i for i, arg in enumerate(args) if i not in taken and arg in set(names)), None)


def split(args: Sequence[str], own: Iterable[str]) -> tuple[list[str], list[str]]:
    """``args`` cut in two: the options whose top-level name is in ``own`` (``n_trials``, ``sampler.init_args.seed``
    under ``sampler``), and everything else, each option with its value."""
    own = set(own)
    mine: list[str] = []
    rest: list[str] = []
    spans = {o.start: o for o in options(args)}
    i = 0
    while i < len(args):
        option = spans.get(i)
        end = option.end if option else i + 1
        (mine if option and option.name.split(".")[0] in own else rest).extend(args[i:end])
        i = end
    return mine, rest
