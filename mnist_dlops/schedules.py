"""Learning-rate schedules over a whole run: each takes the optimizer and the run's total number of steps."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat
from torch.optim import Optimizer

from mnist_dlops.errors import ConfigError


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's one-cycle policy spanning the whole run: warm up to the optimizer's lr, then anneal far below it.

    The optimizer's ``lr`` is the peak, so a config or a sweep sets the learning rate in one place; ``max_lr``
    overrides it only when given. Momentum (Adam's beta1, SGD's momentum) is left as the optimizer sets it unless
    ``cycle_momentum`` is on.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        max_lr: Optional[PositiveFloat] = None,
        pct_start: ClosedUnitInterval = 0.25,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: PositiveFloat = 25.0,
        final_div_factor: PositiveFloat = 1e4,
        cycle_momentum: bool = False,
    ) -> None:
        """
        Args:
            optimizer: The optimizer whose learning rate is scheduled (given by the module).
            total_steps: Optimizer steps in the run (given by the module).
            max_lr: Peak learning rate, reached after ``pct_start`` of the run; default: the optimizer's ``lr``.
            pct_start: Fraction of the run spent warming up.
            anneal_strategy: Shape of the warm-up and anneal phases.
            div_factor: The run starts at ``max_lr / div_factor``.
            final_div_factor: The run ends at ``max_lr / (div_factor * final_div_factor)``.
            cycle_momentum: Also cycle the momentum (SGD) or beta1 (Adam) inversely to the lr, as torch does.
        """
        peaks = [max_lr] * len(optimizer.param_groups) if max_lr else [g["lr"] for g in optimizer.param_groups]
        # torch divides by the warm-up's length in steps minus one: a warm-up of exactly one step (a run of four
        # steps at the default pct_start) would divide by zero, so such a warm-up is stretched by half a step.
        if abs(pct_start * total_steps - 1) < 1e-9 and total_steps > 1:
            pct_start = 1.5 / total_steps
        super().__init__(
            optimizer,
            max_lr=peaks,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            cycle_momentum=cycle_momentum,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the schedule; a run resumed with another length cannot keep a one-cycle shape, so say so."""
        planned = state_dict.get("total_steps")
        if planned is not None and planned != self.total_steps:
            raise ConfigError(
                f"the checkpoint's one-cycle schedule spans {planned} steps, this run {self.total_steps}: resume with "
                "the same trainer.max_epochs/max_steps, or start a new run from these weights"
            )
        super().load_state_dict(state_dict)
