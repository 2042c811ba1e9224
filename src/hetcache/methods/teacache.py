"""TeaCache on the HetCache engine: timestep-level reuse of the whole block stack's residual.

TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", arXiv 2411.19108;
Wan2.1 port in ali-vilab/TeaCache, TeaCache4Wan2.1) accumulates the polynomial-rescaled relative L1 change of the
timestep modulation and skips a step (reusing the residual of the last computed step) while the sum stays below a
threshold. That is exactly the engine's plan with kappa = 1 (no PARTIAL region) and one FULL after every reuse
run (refresh_every = 1), so TeaCache here is a `HetCacheConfig`: a REUSE step runs no main block and no VACE
block, and a plan without PARTIAL steps runs the stock block forward on its FULL steps.

Deviations from TeaCache4Wan2.1, all from the engine's plan (`hetcache.plan`):
- the polynomial value is clamped at 0, so the accumulator never decreases (TeaCache's Wan polynomial is
  negative for rel-L1 < 0.0043 and > 0.102, which would make large changes cause skips), and rel-L1 is capped
  where the fitted polynomial peaks (about 0.079 for 1.3B), so a larger change never counts as a smaller one;
- the last step always computes (with `use_ret_steps`, TeaCache4Wan2.1 does not force it);
- one plan for both CFG branches (TeaCache keeps one accumulator per branch, but on Wan2.1 the modulation
  depends on the timestep only, so both branches decide the same);
- on checkpoints other than Wan2.1 1.3B / 14B (e.g. tiny test models) the polynomial is the identity;
- warm-up: TeaCache4Wan2.1 computes the first 5 of its 50 steps (`use_ret_steps`); given the run's step count,
  the warm-up keeps that share (`warmup_for`: 2 of 20 steps, 5 of 50), so a 20-step run is not forced to compute
  a quarter of its steps.
"""

from __future__ import annotations

from typing import Any

from hetcache.config import HetCacheConfig

# Threshold on the accumulated rescaled distance. 0.10 is the "fast" threshold TeaCache4Wan2.1 gives for
# Wan2.1-T2V-1.3B with `use_ret_steps`, the coefficient set hetcache applies (plan.TEACACHE_WAN21_COEFFICIENTS);
# lower is closer to `full`, higher is faster.
TEACACHE_DELTA = 0.10
# With `use_ret_steps` TeaCache4Wan2.1 computes the first 5 steps of each branch, for its 50-step recipe.
TEACACHE_WARMUP_STEPS = 5
TEACACHE_RECIPE_STEPS = 50
# TeaCache has no cap on consecutive reuses; the engine needs one, so this one never binds in practice.
TEACACHE_MAX_REUSE = 1000


def warmup_for(steps: int | None) -> int:
    """TeaCache's warm-up steps for a run of `steps` steps: the recipe's 5 of 50 at the same share, at least 1
    (None: the recipe's 5)."""
    if steps is None:
        return TEACACHE_WARMUP_STEPS
    return max(1, int(TEACACHE_WARMUP_STEPS * steps / TEACACHE_RECIPE_STEPS + 0.5))


def teacache_config(
    delta: float = TEACACHE_DELTA,
    *,
    steps: int | None = None,
    warmup_steps: int | None = None,
    max_reuse: int = TEACACHE_MAX_REUSE,
    **overrides: Any,
) -> HetCacheConfig:
    """TeaCache as an engine config: thresholds only (kappa 1), every computed step FULL (refresh_every 1).
    `warmup_steps` defaults to `warmup_for(steps)`."""
    warmup = warmup_for(steps) if warmup_steps is None else warmup_steps
    options = {"kappa": 1.0, "refresh_every": 1, **overrides}
    return HetCacheConfig(delta=delta, warmup_steps=warmup, max_reuse=max_reuse, **options)
