"""``python -m mnist_dlops.registry``, kept for scripts written before the commands moved to ``commands/registry.py``."""

from mnist_dlops.commands.registry import main

if __name__ == "__main__":
    main()
