"""Lines from the libraries underneath that a user would read as trouble, silenced in our commands, each with a reason."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex, category): warnings raised inside Lightning or torch by their own code, not by our use of them.
WARNINGS = [
    # Lightning's own pytree helper trips torch's deprecation of LeafSpec: Lightning's to fix.
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    # Prediction over our in-memory batches: Lightning cannot find a sampler's indices, which predict never uses.
    (r"Couldn't infer the batch indices fetched from your dataloader", UserWarning),
    # A run evaluated from another path (a pipeline stage's copy, a moved folder): our checkpoint callback always
    # writes to the run's own checkpoints/, so Lightning's note that the recorded folder differs is not news.
    (r"The dirpath has changed from", UserWarning),
    # A resumed run's checkpoints/ holds its earlier checkpoints by design (a new run's folder is always new).
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
]
# Loggers, and the level below which they are not printed. torch's ONNX exporter lists torchvision's operators it
# skips because torchvision is not installed (we export no torchvision operator).
LOGGERS = {"torch.onnx._internal.exporter._registration": logging.ERROR,
           # MLflow's note that it creates (or migrates) an empty store's tables: its bookkeeping, on first use; and
           # a database error (locked, full, read-only), which it logs with a 90-line traceback and then raises: the
           # raised error is what the user reads, as one line naming the cause.
           "mlflow.store.db.utils": logging.CRITICAL,
           # Lightning's MLflow logger warns that the experiment it is about to create does not exist yet.
           "pytorch_lightning.loggers.mlflow": logging.ERROR}


# The libraries' own news (Lightning's seed, devices and summary lines; Neptune's and W&B's banners): shown at
# ``--log_level info`` and below, not by default.
CHATTY = ("pytorch_lightning", "lightning_fabric", "lightning", "neptune", "neptune_no_prefix", "wandb")
_shown = ["WARNING"]


def show(level: str | None = None) -> None:
    """Within ``quiet``: print the libraries' lines of ``level`` (``info``, ``warning``...) and above; without one,
    the level chosen last again (Neptune sets its own on import)."""
    _shown[0] = (level or _shown[0]).upper()
    for name in CHATTY:
        logging.getLogger(name).setLevel(_shown[0])


@contextmanager
def quiet() -> Iterator[None]:
    """Within this block, the lines listed above are not printed, nor the libraries' news below a warning."""
    levels = {name: logging.getLogger(name).level for name in (*LOGGERS, *CHATTY)}
    with warnings.catch_warnings():
        for message, category in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for name, level in LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        show("warning")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
