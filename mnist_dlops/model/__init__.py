"""The trained model outside training: its export formats (``formats.py``), what is served (``served.py``) and its
input-drift reference (``reference.py``)."""
