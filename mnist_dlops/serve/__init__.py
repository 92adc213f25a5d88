"""Serve a trained model over HTTP: ``mnist-dlops serve --model models:/mnist-digits@production``.

``model.py`` finds and checks what is served (a registered version, an export, a checkpoint); ``api.py`` is the
LitServe API, the upload handling and the page; ``page.html`` is the draw-a-digit page; ``command.py`` the command.
"""
