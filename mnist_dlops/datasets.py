"""``python -m mnist_dlops.datasets``, kept for scripts written before the commands moved to ``commands/datasets.py``."""

from mnist_dlops.commands.datasets import main

if __name__ == "__main__":
    main()
