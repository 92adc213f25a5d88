"""A run on disk: its folders (``folders.py``), its checkpoints (``checkpoints.py``) and its record of config and
provenance (``record.py``)."""
