"""The timestep-level step plan: which denoising steps run FULL, PARTIAL or REUSE.

For Wan2.1 the timestep modulation e_t depends only on t and the weights, so the whole plan is known before
the first step: a printable string such as "FFRRPRPF...", shared by both CFG branches. It comes from a
threshold `delta` on the accumulated change of e_t, or is solved from a budget (a fraction of dense FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetcache import flops, select, tokens

if TYPE_CHECKING:
    from hetcache.config import HetCacheConfig

STEP_KINDS = "FPR"  # FULL, PARTIAL, REUSE

# TeaCache's polynomial rescaling of the relative L1 change of the timestep modulation (timestep_proj, "e0"),
# highest degree first: ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py, the `use_ret_steps` sets.
# They were fitted on the Wan2.1 T2V checkpoints; the VACE checkpoints build on the T2V DiT of the same size,
# so these are the nearest published fit (recalibrating on VACE outputs would be better).
TEACACHE_WAN21_COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "1.3B": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    "14B": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}

# Relative offset of a solved delta above the lower end of its decision interval: far enough from the
# breakpoint that rounding cannot flip a decision, close enough that it is the interval's smallest delta.
_SOLVE_RTOL = 1e-6


def model_family(config: Any) -> str | None:
    """The Wan2.1 size class of a transformer config ("1.3B", "14B"), or None when it is neither."""

    def get(name: str) -> Any:
        return config[name] if isinstance(config, Mapping) else getattr(config, name)

    dim = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    layers = int(get("num_layers"))
    if (dim, layers) == (1536, 30):
        return "1.3B"
    if (dim, layers) == (5120, 40):
        return "14B"
    return None


@torch.no_grad()
def timestep_modulations(transformer: torch.nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep_proj vector e_t of every timestep, [S, 6 * dim] float32 on the transformer's device.

    Runs the transformer's own condition embedder on all timesteps at once, exactly as its forward does for
    the time part (sinusoidal projection, time MLP in its own dtype, cast to the compute dtype, SiLU,
    time_proj); the text embedder is not needed.
    """
    embedder = transformer.condition_embedder
    timesteps = torch.as_tensor(timesteps, device=transformer.device).reshape(-1)
    sinusoid = embedder.timesteps_proj(timesteps)
    mlp_dtype = next(iter(embedder.time_embedder.parameters())).dtype
    if sinusoid.dtype != mlp_dtype and mlp_dtype != torch.int8:
        sinusoid = sinusoid.to(mlp_dtype)
    temb = embedder.time_embedder(sinusoid).to(transformer.dtype)
    return embedder.time_proj(embedder.act_fn(temb)).float()


def _polynomial(coefficients: Sequence[float], x: float) -> float:
    value = 0.0
    for c in coefficients:
        value = value * x + float(c)
    return value


def step_distances(modulations: torch.Tensor, coefficients: Sequence[float] | None) -> list[float]:
    """d_t for every step: d_0 = inf, d_t = max(0, p(mean|e_t - e_{t-1}| / mean|e_{t-1}|)).

    p is the polynomial with `coefficients` (highest degree first), the identity when None. It is clamped
    at 0 so the accumulated distance never decreases. A fitted polynomial is only meaningful up to its
    maximum: past it (rel above about 0.08 for the Wan2.1 fits) it falls and turns negative, which would make
    the largest changes look like no change and reuse them. So rel is capped where the polynomial peaks
    (its largest value on [0, 1]). Computed in float64 on the host.
    """
    if modulations.shape[0] == 0:
        return []
    e = modulations.detach().to("cpu", torch.float64).reshape(modulations.shape[0], -1)
    change = (e[1:] - e[:-1]).abs().mean(dim=1).tolist()
    scale = e[:-1].abs().mean(dim=1).tolist()
    peak = None if coefficients is None else _polynomial_peak(coefficients)
    distances = [math.inf]
    for c, s in zip(change, scale):
        rel = c / s if s > 0 else math.inf
        d = rel if coefficients is None or math.isinf(rel) else _polynomial(coefficients, min(rel, peak))
        distances.append(max(0.0, d))
    return distances


def _polynomial_peak(coefficients: Sequence[float], samples: int = 100_000) -> float:
    """Where p is largest on [0, 1]: the end of the range a TeaCache fit describes."""
    grid = torch.linspace(0.0, 1.0, samples + 1, dtype=torch.float64)
    values = torch.zeros_like(grid)
    for coefficient in coefficients:
        values = values * grid + coefficient
    return float(grid[int(values.argmax())])


def plan_from_distances(
    distances: Sequence[float],
    delta: float,
    *,
    kappa: float = 1.5,
    warmup_steps: int = 2,
    max_reuse: int = 3,
    refresh_every: int = 4,
    full_at: Collection[int] = (),
) -> str:
    """The plan string for threshold `delta`, one letter of STEP_KINDS per step.

    Walking t = 0..S-1 with an accumulator A (0 at the start):
    1. A += d_t.
    2. Steps t < max(1, warmup_steps), t = S-1 and the steps in `full_at` (where a second expert starts) are F.
       Otherwise A >= kappa*delta gives F,
       delta <= A < kappa*delta gives P, A < delta gives R, except that after `max_reuse` R in a row the
       step is P (it must compute; A < delta would give R, so the thresholds give P).
    3. A P is turned into F when it would be the `refresh_every`-th P since the last F, so at most
       refresh_every - 1 P steps separate two F steps (refresh_every = 1: every computed step is F).
    4. After a P or F step A = 0; after an R step A is kept.
    delta <= 0 gives all F.
    """
    if kappa < 1 or warmup_steps < 0 or max_reuse < 0 or refresh_every < 1:
        raise ValueError(
            f"plan parameters out of range: kappa={kappa} (>= 1), warmup_steps={warmup_steps} (>= 0), "
            f"max_reuse={max_reuse} (>= 0), refresh_every={refresh_every} (>= 1)"
        )
    if any(math.isnan(d) or d < 0 for d in distances):
        raise ValueError("step distances must be non-negative numbers")
    num_steps = len(distances)
    if delta <= 0:
        return "F" * num_steps
    letters = []
    accumulated = 0.0
    reuse_run = 0
    partial_run = 0
    for t, d in enumerate(distances):
        accumulated += d
        if t < max(1, warmup_steps) or t == num_steps - 1 or t in full_at or accumulated >= kappa * delta:
            kind = "F"
        elif accumulated >= delta or reuse_run >= max_reuse:
            kind = "F" if partial_run + 1 >= refresh_every else "P"
        else:
            kind = "R"
        letters.append(kind)
        if kind == "R":
            reuse_run += 1
            continue
        accumulated = 0.0
        reuse_run = 0
        partial_run = 0 if kind == "F" else partial_run + 1
    return "".join(letters)


def validate_plan(plan: str, num_steps: int, full_at: Collection[int] = ()) -> str:
    """Check a user-given plan string (any case) for `num_steps` steps and return it upper-cased. Steps in `full_at`
    (where a second expert starts: nothing of it is cached yet) must be F."""
    plan = plan.strip().upper()
    bad = sorted(set(plan) - set(STEP_KINDS))
    if bad:
        raise ValueError(f"plan has letters {''.join(bad)!r}: use only F (full), P (partial) and R (reuse)")
    if len(plan) != num_steps:
        raise ValueError(
            f"plan has {len(plan)} letters but the run has {num_steps} steps: give one letter per step"
        )
    if num_steps and plan[0] != "F":
        raise ValueError(
            f"plan starts with {plan[0]!r}: the first step must be F (nothing is cached before it)"
        )
    for step in full_at:
        if step < len(plan) and plan[step] != "F":
            raise ValueError(f"plan has {plan[step]!r} at step {step}, where the second expert starts: make it F "
                             "(each expert keeps its own caches, empty at its first step)")
    return plan


def plan_cost(plan: str, full_cost: float, partial_cost: float, reuse_cost: float) -> float:
    """Total cost of a plan, given the cost of one step of each kind (any unit)."""
    per_kind = {"F": full_cost, "P": partial_cost, "R": reuse_cost}
    return float(sum(per_kind[kind] for kind in plan))


def _decision_breakpoints(distances: Sequence[float], kappa: float, max_reuse: int) -> list[float]:
    """Every delta at which some decision of plan_from_distances can change, sorted.

    The accumulator only ever holds a sum of at most max_reuse + 1 consecutive distances, accumulated in
    the same order as here (so the floats are identical); a decision flips where delta crosses such a sum
    A (R/P) or A / kappa (P/F). Between two breakpoints the plan is constant.
    """
    points = set()
    for start in range(len(distances)):
        accumulated = 0.0
        for d in distances[start : start + max_reuse + 1]:
            accumulated += d
            if not math.isfinite(accumulated):
                break
            if accumulated > 0:
                points.update((accumulated, accumulated / kappa))
    return sorted(points)


def solve_budget(
    distances: Sequence[float],
    budget: float,
    *,
    full_cost: float,
    partial_cost: float,
    reuse_cost: float,
    kappa: float = 1.5,
    warmup_steps: int = 2,
    max_reuse: int = 3,
    refresh_every: int = 4,
    full_at: Collection[int] = (),
) -> tuple[float, str]:
    """The smallest delta (most compute) whose plan costs at most `budget` x the dense cost, and that plan.

    The cost is not monotone in delta (the guards), so instead of a bisection every decision interval is
    tried: the plan is constant on (b_k, b_k+1] between consecutive breakpoints, and the first passing
    interval, in increasing delta, is taken. The returned delta lies just above its lower end b_k, by at
    most 1e-6 x b_k (when b_k = 0: 1e-6 x b_1); no delta below b_k passes. When the all-F plan fits
    (budget 1) the answer is (0.0, all F). When no plan fits, the cheapest plan (smallest delta among
    equals) and its delta are returned: the caller compares plan_cost with the budget and warns.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget {budget} is not a fraction of the dense cost in (0, 1]")
    if full_cost <= 0 or partial_cost < 0 or reuse_cost < 0:
        raise ValueError("step costs must be positive for FULL and non-negative for PARTIAL and REUSE")
    options = dict(kappa=kappa, warmup_steps=warmup_steps, max_reuse=max_reuse, refresh_every=refresh_every,
                   full_at=full_at)
    limit = budget * len(distances) * full_cost
    costs = (full_cost, partial_cost, reuse_cost)
    dense = plan_from_distances(distances, 0.0, **options)
    if plan_cost(dense, *costs) <= limit:
        return 0.0, dense

    bounds = [0.0, *_decision_breakpoints(distances, kappa, max_reuse)]
    tried = []
    for lower, upper in zip(bounds, [*bounds[1:], math.inf]):
        if math.isinf(upper):
            delta = lower * (1 + _SOLVE_RTOL) if lower > 0 else 1.0
        else:
            delta = lower + _SOLVE_RTOL * min(upper - lower, lower if lower > 0 else upper)
        plan = plan_from_distances(distances, delta, **options)
        cost = plan_cost(plan, *costs)
        if cost <= limit:
            return delta, plan
        tried.append((cost, delta, plan))
    _, delta, plan = min(tried, key=lambda item: item[0])
    return delta, plan


def describe_plan(plan: str) -> str:
    """A one-line summary such as "50 steps: 12 F, 18 P, 20 R"."""
    counts = ", ".join(f"{plan.count(kind)} {kind}" for kind in STEP_KINDS)
    return f"{len(plan)} steps: {counts}"


@dataclass(frozen=True)
class Experts:
    """The transformers of a two-expert pipeline (Wan2.2) in the order they run, and where they switch: the first
    runs the steps whose timestep is at least `boundary` (`boundary_ratio` x the scheduler's training steps)."""

    models: tuple[torch.nn.Module, ...]
    boundary: float

    def switch(self, timesteps: torch.Tensor | Sequence[float]) -> int | None:
        """The first step of the second expert, or None when it runs no step."""
        values = [float(t) for t in timesteps]
        return next((i for i, t in enumerate(values) if t < self.boundary), None)

    def owner(self, step: int, timesteps: torch.Tensor | Sequence[float]) -> int:
        """Which expert (0 or 1) runs `step`."""
        switch = self.switch(timesteps)
        return int(switch is not None and step >= switch)


def resolve_plan(
    transformer: torch.nn.Module,
    config: HetCacheConfig,
    partition: tokens.TokenPartition,
    text_len: int,
    *,
    timesteps: torch.Tensor | None,
    num_steps: int | None,
    requested_steps: int | None = None,
    experts: Experts | None = None,
) -> tuple[str, float | None, list[str]]:
    """The step plan for one video: a fixed string, or thresholds / a budget over the timestep signal.

    `timesteps` are those of the solver steps that run (S' of them); `requested_steps` (S, default S') is the step
    count the user asked for, which a budget is relative to: a plan of S' steps may spend budget x S / S' FULL
    steps' worth per step. With two `experts` each step's signal comes from the expert that runs it, and the
    second expert's first step is F.
    """
    notes: list[str] = []
    switch = experts.switch(timesteps) if experts is not None and timesteps is not None else None
    full_at = () if switch is None else (switch,)
    if config.plan is not None:
        if num_steps is not None and len(config.plan) != num_steps:
            raise ValueError(f"plan has {len(config.plan)} letters but the run has {num_steps} steps")
        return validate_plan(config.plan, len(config.plan), full_at), None, notes
    if timesteps is None:
        raise ValueError("threshold and budget plans need the timesteps: use a pipeline, or pass timesteps= to enable")
    if config.budget is None:
        distances = model_distances(transformer, timesteps, experts)
        return plan_from_distances(distances, config.delta, **_guards(config), full_at=full_at), config.delta, notes
    delta, letters, share = _budget_plan(transformer, config, partition, text_len, timesteps, requested_steps,
                                         experts)
    if share > config.budget + 1e-9:
        notes.append(f"budget {config.budget:.2f} is below what the plan guards allow; cheapest plan costs {share:.2f}")
    return letters, delta, notes


def model_distances(transformer: torch.nn.Module, timesteps: torch.Tensor,
                    experts: Experts | None = None) -> list[float]:
    """d_t of every step from the model's own timestep modulation and its family's TeaCache polynomial (with two
    experts, each step's from the expert that runs it)."""
    coefficients = TEACACHE_WAN21_COEFFICIENTS.get(model_family(transformer.config) or "")
    signal = timestep_modulations(transformer, timesteps)
    switch = experts.switch(timesteps) if experts is not None else None
    if switch is not None:
        signal[switch:] = timestep_modulations(experts.models[1], timesteps[switch:]).to(signal.device)
    return step_distances(signal, coefficients)


def _guards(config: HetCacheConfig) -> dict[str, Any]:
    return dict(kappa=config.kappa, warmup_steps=config.warmup_steps, max_reuse=config.max_reuse,
                refresh_every=config.refresh_every)


def _budget_plan(transformer: torch.nn.Module, config: HetCacheConfig, partition: tokens.TokenPartition,
                 text_len: int, timesteps: torch.Tensor, requested_steps: int | None,
                 experts: Experts | None = None) -> tuple[float, str, float]:
    """(delta, letters, cost as a share of `requested_steps` dense steps) of the budget's plan over `timesteps`."""
    distances = model_distances(transformer, timesteps, experts)
    switch = experts.switch(timesteps) if experts is not None else None
    costs = step_costs(transformer, partition, config, text_len)
    scale = (requested_steps or len(distances)) / len(distances)
    delta, letters = solve_budget(distances, min(1.0, config.budget * scale), **costs, **_guards(config),
                                  full_at=() if switch is None else (switch,))
    return delta, letters, plan_cost(letters, **costs) / (len(letters) * scale * costs["full_cost"])


def step_costs(transformer: torch.nn.Module, partition: tokens.TokenPartition, config: HetCacheConfig,
               text_len: int) -> dict[str, float]:
    """Analytic FLOPs of one FULL, PARTIAL and REUSE call for this video (text K/V cached)."""
    shape = flops.ModelShape.from_config(transformer.config)
    n = partition.num_tokens
    rows = partial_row_count(partition, config)
    return dict(
        full_cost=flops.forward_flops(shape, n, n, text_len, text_kv=False),
        partial_cost=flops.forward_flops(shape, n, rows, text_len, text_kv=False),
        reuse_cost=flops.forward_flops(shape, n, 0, text_len, text_kv=False),
    )


def solver_steps(
    transformer: torch.nn.Module,
    config: HetCacheConfig,
    requested_steps: int,
    *,
    partition: tokens.TokenPartition | None = None,
    text_len: int = 512,
    timesteps_for: Callable[[int], torch.Tensor] | None = None,
    experts: Experts | None = None,
) -> int:
    """S': how many of the `requested_steps` solver steps run (the scheduler is set to S' steps over the same
    noise range).

    `step_fraction` gives it directly (rounded, at least 1). A `budget` without `step_fraction` solves it jointly
    with the letters: the largest S' (at most `max(max_step_fraction, budget) x requested_steps` when capped)
    whose plan meets the budget (relative to `requested_steps` dense steps); that needs the token counts
    (`partition`) and the timesteps of any step count (`timesteps_for`). Otherwise every requested step runs.
    """
    if config.step_fraction is not None:
        return max(1, round(requested_steps * config.step_fraction))
    if config.budget is None or config.plan is not None:
        return requested_steps
    if partition is None or timesteps_for is None:
        raise ValueError("a budget plan needs the mask to choose its solver steps: pass mask=")
    most = requested_steps
    if config.max_step_fraction is not None:
        most = max(1, min(requested_steps, math.floor(requested_steps * max(config.max_step_fraction, config.budget)
                                                      + 1e-9)))
    for steps in range(most, 0, -1):
        _, _, share = _budget_plan(transformer, config, partition, text_len, timesteps_for(steps), requested_steps,
                                   experts)
        if share <= config.budget + 1e-9:
            return steps
    return 1


def partial_row_count(partition: tokens.TokenPartition, config: HetCacheConfig) -> int:
    """Rows a PARTIAL step computes: all generative, ceil(rho_m |M|) margin, ceil(rho_c |C|) context tokens."""
    counts = partition.counts()
    margin = select.context_count(counts["margin"], config.margin_ratio)
    return counts["generative"] + margin + select.context_count(counts["context"], config.context_ratio)
