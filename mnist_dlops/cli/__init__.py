"""The command line of fit/validate/test/predict: the app (``app.py``), its parser (``parser.py``), the one reader of
raw arguments (``argv.py``), what ``--ckpt_path`` restores (``restore.py``), and sweeps of its runs (``sweep.py``)."""
