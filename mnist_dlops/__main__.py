"""``mnist-dlops <command>``: every command behind one entry point, as litgpt's; ``python cli.py fit`` and
``python -m mnist_dlops.<command>`` still work.

    mnist-dlops fit -c configs/cnn.yaml          # fit, validate, test, predict: LightningCLI (cli/app.py)
    mnist-dlops sweep -c configs/sweeps/quick.yaml
    mnist-dlops runs | export | registry | datasets | serve ...
"""

from __future__ import annotations

import sys
from importlib import import_module
from pathlib import Path
from typing import Optional

from mnist_dlops import errors

# command: (module whose main(argv) runs it, what it does); fit/validate/test/predict go to LightningCLI.
COMMANDS = {
    "sweep": ("mnist_dlops.commands.sweep", "an Optuna study of trials, each a fit run"),
    "runs": ("mnist_dlops.commands.runs", "the table of training runs"),
    "export": ("mnist_dlops.commands.export", "a checkpoint as TorchScript or ONNX"),
    "registry": ("mnist_dlops.commands.registry", "register, alias, list and promote models in MLflow"),
    "datasets": ("mnist_dlops.commands.datasets", "data versions on DVC"),
    "serve": ("mnist_dlops.serve.__main__", "the model server and its page"),
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
    errors.INVOKED_AS = "mnist-dlops" if Path(sys.argv[0]).name == "mnist-dlops" else "python -m mnist_dlops"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(errors.INVOKED_AS))
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in errors.TRAINING or command.startswith("-"):  # LightningCLI reads its own subcommands and options
        from mnist_dlops.cli.app import cli_main

        cli_main(argv)
    elif command in COMMANDS:
        import_module(COMMANDS[command][0]).main(rest)
    else:
        errors.fail(f"{command}: no such command (one of {', '.join([*errors.TRAINING, *COMMANDS])})", 2)


if __name__ == "__main__":
    main()
