"""Serve a trained model over HTTP: ``mnist-dlops serve --model models:/mnist-digits@production``."""
