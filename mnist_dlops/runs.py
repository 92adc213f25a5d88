"""``python -m mnist_dlops.runs``, kept for scripts written before the commands moved to ``commands/runs.py``."""

from mnist_dlops.commands.runs import main

if __name__ == "__main__":
    main()
