"""AdaCache on WanVACE: content-adaptive reuse of block residuals, with the paper's codebook of cache rates.

AdaCache (Kahatapitiya et al., "Adaptive Caching for Faster Video Generation with Diffusion Transformers",
arXiv 2411.02397, section 4.2) caches the residuals a DiT block adds (attention, cross-attention, MLP) and reuses
them for the next tau steps. After each computed step t it measures the rate of change of a residual p since
the previous computed step t+k, c_t = ||p_t - p_{t+k}|| / k (eq. 4, L1), and picks the next rate tau from a
codebook of thresholds (eq. 5): a larger change recomputes sooner. The paper uses one metric and one rate for
all layers ("when we recompute residuals in a certain step, we do so for the whole DiT").

Here:
- every main block and every VACE block is cached; on a reuse step a main block returns h + R_l (its cached
  residual out - in) and a VACE block returns (its cached hint, c + its cached control residual), so no block
  does any work. One rate per CFG branch; state per branch;
- the metric is the relative L1 distance ||p_t - p_prev||_1 / ||p_prev||_1 / k of the residual of main block
  `metric_layer` (default: the middle one), as the authors' released code computes it
  (AdaCache-DiT/AdaCache, Open-Sora `STDiT3Block.compute_next_step`, which also divides by the steps since the
  last computation);
- codebooks (paper, appendix A.1): for schedules of more than 30 steps the 100-step one,
  {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3}, which the released code uses by default; for 30
  steps or fewer AdaCache-fast's 30-step one, {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}. Rates
  count steps of the schedule the codebook was made for, so they are rescaled to the run's step count S
  (x S/100 or x S/30, rounded half up, at least 1: at 50 steps the 100-step rates halve), then multiplied by
  `codebook_scale` (the knob a sweep varies; < 1 recomputes sooner). A rate is the first whose threshold
  exceeds the metric, else the last; the next computed step is t + rate;
- steps 0 and 1 compute (a distance needs two computed steps), as do the last two steps (the released code's
  `skip_cache_steps`); indexed by step index, never by timestep value;
- residuals are cached for the whole block (the paper's attention and MLP residuals added together: with one
  rate for all they are always reused together);
- Motion Regularization (MoReg, section 4.3) is not used (it is an optional extension of AdaCache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState

from hetcache import flops
from hetcache.methods import base

CODEBOOK_30_STEPS = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
CODEBOOK_100_STEPS = {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3}


@dataclass
class AdaCacheConfig:
    """`codebook` maps metric thresholds to cache rates in steps of the run (None: the paper's codebook for the
    nearest schedule, rescaled to the run's step count); `codebook_scale` multiplies every rate (rounded, at
    least 1); `metric_layer` is the main block whose residual gives the metric (None: num_layers // 2)."""

    codebook: dict[float, int] | None = None
    codebook_scale: float = 1.0
    metric_layer: int | None = None

    def __post_init__(self) -> None:
        if self.codebook is not None:
            if not self.codebook or any(rate < 1 for rate in self.codebook.values()):
                raise ValueError("codebook must map thresholds to rates >= 1")
            self.codebook = {float(k): int(v) for k, v in sorted(self.codebook.items())}
        if not self.codebook_scale > 0:
            raise ValueError(f"codebook_scale must be > 0, got {self.codebook_scale}")

    def codebook_for(self, num_steps: int | None) -> dict[float, int]:
        """The codebook a run of `num_steps` steps uses (None: unknown, the 100-step one unscaled)."""
        if self.codebook is not None:
            return _scaled(self.codebook, self.codebook_scale)
        if num_steps is None:
            return _scaled(CODEBOOK_100_STEPS, self.codebook_scale)
        base, made_for = (CODEBOOK_30_STEPS, 30) if num_steps <= 30 else (CODEBOOK_100_STEPS, 100)
        return _scaled(base, self.codebook_scale * num_steps / made_for)

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> AdaCacheRuntime:
        runtime = AdaCacheRuntime(transformer, self, base.scheduler_of(pipeline))
        if not 0 <= runtime.metric_layer < len(transformer.blocks):
            raise ValueError(f"metric_layer {runtime.metric_layer} is not a main block index")
        hooks = [(block, base.ForwardHook(runtime.main_handler(i))) for i, block in enumerate(transformer.blocks)]
        hooks += [(block, base.ForwardHook(runtime.vace_handler(i))) for i, block in enumerate(transformer.vace_blocks)]
        return base.attach(transformer, runtime, hooks)

    def never_skip(self) -> AdaCacheConfig:
        return dataclasses.replace(self, codebook={1.0: 1}, codebook_scale=1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _scaled(codebook: dict[float, int], factor: float) -> dict[float, int]:
    """Every rate times `factor`, rounded half up, at least 1."""
    return {threshold: max(1, int(rate * factor + 0.5)) for threshold, rate in codebook.items()}


def cache_rate(metric: float, codebook: dict[float, int]) -> int:
    """The rate of the first threshold (ascending) above `metric`, else the last rate."""
    for threshold, rate in codebook.items():
        if metric < threshold:
            return rate
    return list(codebook.values())[-1]


class AdaCacheState(BaseState):
    """One branch: cached residuals per block, the metric residual and the schedule."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.main: dict[int, torch.Tensor] = {}
        self.vace: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.metric_residual: torch.Tensor | None = None
        self.last_computed = -1
        self.next_compute = 0


class AdaCacheRuntime(base.MethodRuntime):
    state_class = AdaCacheState

    def __init__(self, transformer: torch.nn.Module, config: AdaCacheConfig, scheduler: Any = None) -> None:
        super().__init__(transformer, config, scheduler)
        layer = config.metric_layer
        self.metric_layer = len(transformer.blocks) // 2 if layer is None else layer
        self._compute = True
        self._metric_now: torch.Tensor | None = None

    def begin_call(self, call: base.Call, args: tuple, kwargs: dict) -> None:
        state: AdaCacheState = call.state
        forced = call.index <= 1 or (self.num_steps is not None and call.index >= self.num_steps - 2)
        hidden = self.argument("transformer", args, kwargs, "hidden_states")
        cached = state.main.get(0)
        fits = cached is not None and cached.shape[1] == call.tokens and cached.shape[0] == hidden.shape[0]
        self._compute = forced or call.index >= state.next_compute or not fits
        self._metric_now = None

    def main_handler(self, layer: int):
        def handler(original, *args: Any, **kwargs: Any) -> torch.Tensor:
            state: AdaCacheState = self.call.state
            hidden = self.argument("main", args, kwargs, "hidden_states")
            if not self._compute:
                return hidden + state.main[layer]
            out = original(*args, **kwargs)
            state.main[layer] = out - hidden
            if layer == self.metric_layer:
                self._metric_now = state.main[layer]
            return out

        return handler

    def vace_handler(self, layer: int):
        def handler(original, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            state: AdaCacheState = self.call.state
            control = self.argument("vace", args, kwargs, "control_hidden_states")
            if not self._compute:
                hint, residual = state.vace[layer]
                return hint, control + residual
            hint, control_out = original(*args, **kwargs)
            state.vace[layer] = (hint, control_out - control)
            return hint, control_out

        return handler

    def end_call(self, call: base.Call) -> tuple[str, float, int]:
        if not self._compute:
            return "R", flops.embed_flops(self.shape, call.tokens, call.text_len), 0
        state: AdaCacheState = call.state
        rate = 1
        if state.metric_residual is not None and self._metric_now is not None and state.last_computed >= 0:
            steps = max(1, call.index - state.last_computed)
            previous = state.metric_residual.float()
            change = (self._metric_now.float() - previous).abs().sum() / previous.abs().sum().clamp_min(1e-12)
            rate = cache_rate(float(change) / steps, self.config.codebook_for(self.num_steps))
        state.metric_residual = self._metric_now
        state.last_computed = call.index
        state.next_compute = call.index + rate
        return "F", base.dense_flops(self.shape, call.tokens, call.text_len), call.tokens
