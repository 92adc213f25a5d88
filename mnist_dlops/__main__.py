"""``mnist-dlops <command>``: every command behind one entry point (``python cli.py fit`` is LightningCLI's own)."""

from __future__ import annotations

import os
import sys

# `python -m` puts the working directory first on sys.path (`python -P` would not): a yaml.py or torch.py dropped
# there would load before any command's import gate is up. No command imports from it (your own package: install it,
# or put it on PYTHONPATH, and trust it with MNIST_DLOPS_TRUST).
if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.getcwd()):
    del sys.path[0]

from importlib import import_module  # noqa: E402 - after the working directory left sys.path
from typing import Optional  # noqa: E402

from mnist_dlops import errors  # noqa: E402

# command: (module whose main(argv) runs it, what it does); fit/validate/test/predict go to LightningCLI.
COMMANDS = {
    "sweep": ("mnist_dlops.cli.sweep", "an Optuna study of trials, each a fit run"),
    "runs": ("mnist_dlops.commands.runs", "the table of training runs"),
    "export": ("mnist_dlops.commands.export", "a checkpoint as TorchScript or ONNX"),
    "registry": ("mnist_dlops.commands.registry", "register, alias, list and promote models in MLflow"),
    "datasets": ("mnist_dlops.commands.datasets", "data versions on DVC"),
    "serve": ("mnist_dlops.serve.command", "the model server and its page"),
}


def usage(prog: str) -> str:
    """The list of commands, one line each."""
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)", ""]
    lines += [f"  {name:<9} {what}" for name, what in (("fit", "train a model (LightningCLI)"),
                                                      ("validate", "evaluate a checkpoint on the validation set"),
                                                      ("test", "evaluate a checkpoint on the test set"),
                                                      ("predict", "label a folder of images"))]
    lines += [f"  {name:<9} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """Run the command named first in ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage("mnist-dlops"))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in errors.TRAINING or command.startswith("-"):  # LightningCLI reads its own subcommands and options
        from mnist_dlops.cli.app import cli_main

        cli_main(argv)
    elif command in COMMANDS:
        import_module(COMMANDS[command][0]).main(rest)
    else:
        from difflib import get_close_matches

        known = [*errors.TRAINING, *COMMANDS]
        close = get_close_matches(command, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        errors.fail(f"{command}: no such command ({hint}one of {', '.join(known)})", 2)


if __name__ == "__main__":
    main()
