"""``python -m mnist_dlops.export``, kept for scripts written before the commands moved to ``commands/export.py``."""

from mnist_dlops.commands.export import main

if __name__ == "__main__":
    main()
