"""The one argv reader (mnist_dlops/cli/argv.py) against jsonargparse: the same lists, the same reading of each token."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import ActionConfigFile, ArgumentParser

from mnist_dlops.cli import argv

NAMES = ("ckpt_path", "runs_dir", "trainer.max_epochs", "model.network")


def jsonargparse_parser() -> ArgumentParser:
    """A parser with the shapes of our command line: a stacked config file and plain and dotted keys."""
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    for name in NAMES:
        parser.add_argument(f"--{name}", type=str)
    return parser


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(4):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(f"runs_dir: from_file_{i}\n")
        paths.append(str(path))
    return paths


CASES = [
    ["--ckpt_path", "best"],
    ["--ckpt_path=best", "--runs_dir", "runs"],
    ["--ckpt_path", "a", "--ckpt_path", "b"],  # the last one wins
    ["--trainer.max_epochs", "-1"],  # a negative number is a value
    ["--runs_dir", "with space", "--ckpt_path", "-"],  # and so are a word with a space and a lone dash
    ["--runs_dir", "-x y"],
    ["--model.network={'class_path': 'mnist_dlops.networks.MLP', 'init_args': {'hidden': 8}}"],
    ["--ckpt_path", "x=y"],
    ["--runs_dir=", "--ckpt_path", "last"],  # an empty value
]


@pytest.mark.parametrize("args", CASES)
def test_values_agree_with_jsonargparse(args: list[str]) -> None:
    parsed = jsonargparse_parser().parse_args(args)
    for name in NAMES:
        found = argv.last(args, name)
        assert (found.value if found else None) == parsed.get(name), (name, args)


def test_config_files_agree_with_jsonargparse(files: list[str]) -> None:
    args = ["-c", files[0], "--config", files[1], f"--config={files[2]}", f"-c{files[3]}", "--runs_dir", "flag"]
    parsed = jsonargparse_parser().parse_args(args)
    assert argv.config_files(args) == [str(p) for p in parsed.config]
    assert parsed.runs_dir == argv.last(args, "runs_dir").value == "flag"


@pytest.mark.parametrize("args", [["--ckpt_path", "--runs_dir", "x"], ["--runs_dir", "-c", "x.yaml"], ["--ckpt_path"]])
def test_a_missing_value_is_missing_for_both(args: list[str]) -> None:
    """An option followed by another option has no value: jsonargparse refuses it, the reader reads none."""
    with pytest.raises(Exception, match="expected one argument"):
        jsonargparse_parser().parse_args(args)
    assert argv.options(args)[0].value is None


def test_every_token_is_read_once() -> None:
    """Options and their values tile the list: no token is both a value and an option, none is lost."""
    args = ["fit", "-c", "a.yaml", "--trainer.max_epochs", "-1", "--help", "--print_config", "--x=1", "pos"]
    spans = [(o.start, o.end) for o in argv.options(args)]
    assert spans == [(1, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    assert argv.subcommand(args, ("fit", "test")) == 0
    assert argv.subcommand(["--ckpt_path", "fit", "test"], ("fit", "test")) == 2  # "fit" is a value there


def test_split_keeps_each_option_with_its_value() -> None:
    args = ["-c", "sweep.yaml", "--n_trials", "3", "--trainer.max_epochs=2", "--sampler.init_args.seed", "-7",
            "--model.network", "mnist_dlops.networks.MLP", "--help"]
    mine, rest = argv.split(args, {"config", "n_trials", "sampler", "help"})
    assert mine == ["-c", "sweep.yaml", "--n_trials", "3", "--sampler.init_args.seed", "-7", "--help"]
    assert rest == ["--trainer.max_epochs=2", "--model.network", "mnist_dlops.networks.MLP"]
