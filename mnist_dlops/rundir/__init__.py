"""A run on disk: its folder (``folders.py``), which checkpoint it means and reading one (``run.py``), writing
checkpoints (``checkpoints.py``) and its record of config and provenance (``record.py``)."""
