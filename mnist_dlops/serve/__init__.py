"""Serve a trained model over HTTP: ``mnist-dlops serve --model models:/mnist-digits@production``.

``api.py`` is the LitServe API, the upload handling and the page; ``monitoring.py`` its Prometheus metrics;
``page.html`` the draw-a-digit page; ``command.py`` the command. What is served comes from ``mnist_dlops.model``.
"""
