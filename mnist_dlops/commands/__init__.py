"""Commands beside training, one module each: ``runs``, ``export``, ``registry`` (with its promotion gate in
``promote``) and ``datasets``: ``mnist-dlops <command>``. (``sweep`` drives training: ``cli/sweep.py``.)"""
