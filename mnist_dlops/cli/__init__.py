"""The command line of fit/validate/test/predict: the app (``app.py``), its parser (``parser.py``), the one reader of
raw arguments (``argv.py``) and what ``--ckpt_path`` restores (``restore.py``)."""
