"""``python -m mnist_dlops.sweep``, kept for scripts written before the commands moved to ``commands/sweep.py``."""

from mnist_dlops.commands.sweep import main

if __name__ == "__main__":
    main()
