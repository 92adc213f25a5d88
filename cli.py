"""Train, evaluate and predict MNIST from YAML: ``python cli.py fit --config configs/tensorboard.yaml``."""

from mnist_dlops.cli.app import cli_main

if __name__ == "__main__":
    cli_main()
