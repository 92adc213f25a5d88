"""Commands beside fit/validate/test/predict, one module each: ``runs``, ``export``, ``sweep``, ``registry`` (with its
promotion gate in ``promote``) and ``datasets``: ``mnist-dlops <command>``."""
