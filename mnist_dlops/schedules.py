"""Learning-rate schedules over a whole run: each takes the optimizer and the run's total number of steps.

The module calls ``lr_scheduler(optimizer, total_steps)`` once the trainer knows how many optimizer steps the run
will take, and steps the schedule after every optimizer step. torch's own ``CosineAnnealingLR`` and
``PolynomialLR`` already take (optimizer, steps) in that order and can be named in a config as they are.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.optim import Optimizer


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's one-cycle policy (warm up to ``max_lr``, then anneal), spanning the whole run."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        max_lr: float = 0.01,
        pct_start: float = 0.25,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
    ) -> None:
        """
        Args:
            optimizer: The optimizer whose learning rate is scheduled (given by the module).
            total_steps: Optimizer steps in the run (given by the module).
            max_lr: Peak learning rate, reached after ``pct_start`` of the run.
            pct_start: Fraction of the run spent warming up.
            anneal_strategy: Shape of the warm-up and anneal phases.
            div_factor: The run starts at ``max_lr / div_factor``.
            final_div_factor: The run ends at ``max_lr / (div_factor * final_div_factor)``.
        """
        super().__init__(
            optimizer,
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the schedule; a run resumed with another length cannot keep a one-cycle shape, so say so."""
        planned = state_dict.get("total_steps")
        if planned is not None and planned != self.total_steps:
            from mnist_dlops.config_checks import ConfigError

            raise ConfigError(
                f"the checkpoint's one-cycle schedule spans {planned} steps, this run {self.total_steps}: resume with "
                "the same trainer.max_epochs/max_steps, or start a new run from these weights"
            )
        super().load_state_dict(state_dict)
