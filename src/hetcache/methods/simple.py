"""`full` and `fewer-steps`: the two baselines without a cache.

Both run the stock transformer forward. They still attach a pass-through root hook so that `hetcache.stats`,
`hetcache.disable` and the benchmark treat them like every other method (plan letters, analytic FLOPs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hetcache.methods import base


@dataclass
class FullConfig:
    """No cache: every step runs every block (the reference every other method is compared with)."""

    context_parallel: ClassVar[bool] = True  # a pass-through root hook: runs under context parallelism as it is
    steps_fraction: float = 1.0

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> base.MethodRuntime:
        return base.attach(transformer, base.MethodRuntime(transformer, self, base.scheduler_of(pipeline)))

    def never_skip(self) -> FullConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FewerStepsConfig(FullConfig):
    """The same pipeline with `steps_fraction` of the steps (e.g. 25 of 50), no cache.

    Public comparisons on Wan-VACE find this the strongest simple baseline. The step count a run uses is
    `hetcache.methods.inference_steps(config, steps)` = max(1, round(steps * steps_fraction)); the scheduler
    spreads those steps over the same noise range, and the initial latents stay the same.
    """

    steps_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.steps_fraction <= 1.0:
            raise ValueError(f"steps_fraction must be in (0, 1], got {self.steps_fraction}")

    def never_skip(self) -> FewerStepsConfig:
        return dataclasses.replace(self, steps_fraction=1.0)
