import math

import numpy as np
import pytest
import torch
from diffusers import WanVACETransformer3DModel
from tiny_models import diffusers_test_transformer

from hetcache.plan import (
    STEP_KINDS,
    TEACACHE_WAN21_COEFFICIENTS,
    describe_plan,
    model_family,
    plan_cost,
    plan_from_distances,
    solve_budget,
    step_distances,
    timestep_modulations,
    validate_plan,
)

INF = math.inf
COSTS = dict(full_cost=1.0, partial_cost=0.45, reuse_cost=0.01)
NO_GUARDS = dict(warmup_steps=1, max_reuse=100, refresh_every=100)


def random_distances(seed: int, steps: int = 50) -> list[float]:
    rng = np.random.default_rng(seed)
    return [INF, *rng.uniform(0.002, 0.12, steps - 1).tolist()]


def passes(distances, delta, budget, **options) -> bool:
    plan = plan_from_distances(distances, delta, **options)
    return plan_cost(plan, *COSTS.values()) <= budget * len(distances) * COSTS["full_cost"]


# -- plan_from_distances: letters worked out by hand (delta = 1, values exact in binary)


def test_threshold_regions_and_reset():
    # A: .5 R | 1.0 P (A == delta) | 1.5 F (A == 1.5 delta) | .25 R, .5 R, 1.0 P | .75 R | last step F
    distances = [INF, 0.5, 0.5, 1.5, 0.25, 0.25, 0.5, 0.75, 0.0]
    assert plan_from_distances(distances, 1.0, **NO_GUARDS) == "FRPFRRPRF"


def test_kappa_moves_the_full_threshold():
    distances = [INF, 0.5, 0.5, 1.5, 0.25, 0.25, 0.5, 0.75, 0.0]
    assert plan_from_distances(distances, 1.0, kappa=2.0, **NO_GUARDS) == "FRPPRRPRF"
    assert plan_from_distances(distances, 1.0, kappa=1.0, **NO_GUARDS) == "FRFFRRFRF"


def test_single_large_step_is_full_and_reuse_accumulates():
    distances = [INF, 0.4, 0.4, 0.4, 2.0, 0.1, 0.1]
    # .4 R, .8 R, 1.2 P, 2.0 F, .1 R, last F
    assert plan_from_distances(distances, 1.0, **NO_GUARDS) == "FRRPFRF"


def test_warmup_and_last_step():
    distances = [INF, 0.0, 0.0, 0.0, 0.0]
    assert plan_from_distances(distances, 1.0, warmup_steps=3, max_reuse=10) == "FFFRF"
    assert plan_from_distances(distances, 1.0, warmup_steps=0, max_reuse=10) == "FRRRF"
    assert plan_from_distances([INF], 1.0) == "F"
    assert plan_from_distances([], 1.0) == ""


def test_max_reuse_forces_partial():
    distances = [INF] + [0.0] * 8
    assert plan_from_distances(distances, 1.0, warmup_steps=1, max_reuse=2, refresh_every=100) == "FRRPRRPRF"
    assert plan_from_distances(distances, 1.0, warmup_steps=1, max_reuse=0, refresh_every=100) == "FPPPPPPPF"


def test_refresh_every_turns_partial_into_full():
    distances = [INF] + [1.0] * 8  # every step alone reaches delta: P
    assert plan_from_distances(distances, 1.0, warmup_steps=1, refresh_every=3) == "FPPFPPFPF"
    assert plan_from_distances(distances, 1.0, warmup_steps=1, refresh_every=1) == "F" * 9
    # reuse steps do not count towards the refresh; forced partials do
    halves = [INF] + [0.5] * 8
    assert plan_from_distances(halves, 1.0, warmup_steps=1, refresh_every=2) == "FRPRFRPRF"
    zeros = [INF] + [0.0] * 8
    assert plan_from_distances(zeros, 1.0, warmup_steps=1, max_reuse=0, refresh_every=2) == "FPFPFPFPF"


def test_plan_guards_hold_on_random_distances():
    distances = random_distances(1)
    for delta in (0.01, 0.05, 0.1, 0.3, 10.0):
        plan = plan_from_distances(distances, delta, warmup_steps=2, max_reuse=3, refresh_every=4)
        assert set(plan) <= set(STEP_KINDS) and len(plan) == len(distances)
        assert plan[:2] == "FF" and plan[-1] == "F"
        assert "RRRR" not in plan
        assert all("PPPP" not in run for run in plan.replace("R", "").split("F"))


def test_nonpositive_delta_is_all_full_and_bad_arguments_raise():
    distances = random_distances(2, steps=10)
    assert plan_from_distances(distances, 0.0) == "F" * 10
    assert plan_from_distances(distances, -1.0) == "F" * 10
    with pytest.raises(ValueError):
        plan_from_distances(distances, 1.0, kappa=0.5)
    with pytest.raises(ValueError):
        plan_from_distances(distances, 1.0, refresh_every=0)
    with pytest.raises(ValueError):
        plan_from_distances([INF, -0.1], 1.0)


def test_plans_are_deterministic():
    distances = random_distances(3)
    assert plan_from_distances(distances, 0.1) == plan_from_distances(list(distances), 0.1)
    assert solve_budget(distances, 0.4, **COSTS) == solve_budget(list(distances), 0.4, **COSTS)


# -- validate_plan, plan_cost, describe_plan


def test_validate_plan():
    assert validate_plan("ffrpF", 5) == "FFRPF"
    with pytest.raises(ValueError, match="letters 'X'"):
        validate_plan("FXR", 3)
    with pytest.raises(ValueError, match="3 letters but the run has 4 steps"):
        validate_plan("FRR", 4)
    with pytest.raises(ValueError, match="first step must be F"):
        validate_plan("RFF", 3)


def test_plan_cost_and_description():
    assert plan_cost("FFPRR", 4.0, 2.0, 0.5) == 4 + 4 + 2 + 0.5 + 0.5
    assert describe_plan("FFPRRF") == "6 steps: 3 F, 1 P, 2 R"


# -- solve_budget


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("budget", [0.33, 0.42, 0.6, 0.85])
def test_solve_budget_meets_budget_with_smallest_delta(seed, budget):
    distances = random_distances(seed)
    delta, plan = solve_budget(distances, budget, **COSTS)
    assert plan == plan_from_distances(distances, delta)
    assert plan_cost(plan, *COSTS.values()) <= budget * len(distances)
    # Tolerance: the returned delta sits at most 1e-6 x delta above the smallest passing delta.
    assert not passes(distances, delta * (1 - 2e-6), budget)
    grid = np.geomspace(1e-4, 2.0, 4000)
    smaller_passing = [g for g in grid if g < delta and passes(distances, g, budget)]
    assert all(delta - g <= 1e-6 * delta for g in smaller_passing)


def test_solve_budget_with_guards_off():
    distances = random_distances(4)
    options = dict(warmup_steps=1, max_reuse=6, refresh_every=50)
    delta, plan = solve_budget(distances, 0.3, **COSTS, **options)
    assert plan == plan_from_distances(distances, delta, **options)
    assert plan_cost(plan, *COSTS.values()) <= 0.3 * len(distances)
    assert not passes(distances, delta * (1 - 2e-6), 0.3, **options)


def test_solve_budget_one_is_dense():
    distances = random_distances(5)
    assert solve_budget(distances, 1.0, **COSTS) == (0.0, "F" * len(distances))


def test_infeasible_budget_returns_cheapest_plan():
    distances = random_distances(6)
    delta, plan = solve_budget(distances, 0.05, **COSTS)
    cost = plan_cost(plan, *COSTS.values())
    assert cost > 0.05 * len(distances)
    assert plan == plan_from_distances(distances, delta)
    grid = np.geomspace(1e-4, 100.0, 2000)
    assert cost <= min(plan_cost(plan_from_distances(distances, g), *COSTS.values()) for g in grid)


def test_solve_budget_rejects_bad_budget():
    with pytest.raises(ValueError):
        solve_budget(random_distances(7), 0.0, **COSTS)
    with pytest.raises(ValueError):
        solve_budget(random_distances(7), 1.5, **COSTS)


# -- the step signal


def manual_rel(e: torch.Tensor) -> list[float]:
    rows = e.double().tolist()
    rels = []
    for prev, cur in zip(rows, rows[1:]):
        change = sum(abs(c - p) for c, p in zip(cur, prev)) / len(cur)
        scale = sum(abs(p) for p in prev) / len(prev)
        rels.append(change / scale)
    return rels


MODULATIONS = torch.tensor(
    [
        [1.0, -2.0, 3.0, 0.5, -1.0, 2.0],
        [1.1, -2.0, 2.9, 0.5, -1.2, 2.0],
        [1.1, -2.0, 2.9, 0.5, -1.2, 2.0],
        [2.0, -1.0, 2.0, 1.5, -0.2, 3.0],
    ]
)


def test_step_distances_identity():
    distances = step_distances(MODULATIONS, None)
    assert distances[0] == INF
    assert distances[1:] == pytest.approx(manual_rel(MODULATIONS), rel=1e-12)
    assert distances[2] == 0.0


def test_step_distances_polynomial_is_clamped():
    coefficients = (2.0, -1.0, 0.0)  # p(x) = 2x^2 - x: negative below x = 0.5
    rels = manual_rel(MODULATIONS)
    assert rels[0] < 0.5 < rels[2]
    capped = [min(r, 1.0) for r in rels]  # p peaks at x = 1 on [0, 1]
    expected = [max(0.0, 2 * r * r - r) for r in capped]
    distances = step_distances(MODULATIONS, coefficients)
    assert distances[1:] == pytest.approx(expected, rel=1e-12)
    assert distances[1] == 0.0 and distances[3] > 0


def test_step_distances_cap_rel_at_the_fit_peak():
    """Past the peak of a TeaCache fit a larger change must not look smaller (nor negative)."""
    coefficients = TEACACHE_WAN21_COEFFICIENTS["1.3B"]
    base = torch.ones(1, 12, dtype=torch.float64)
    small, large = base * 1.05, base * 1.5  # rel 0.05 (inside the fit) and 0.5 (far past its peak near 0.079)
    d_small = step_distances(torch.cat([base, small]), coefficients)[1]
    d_large = step_distances(torch.cat([base, large]), coefficients)[1]
    assert d_small == pytest.approx(float(np.polyval(coefficients, 0.05)), rel=1e-9)
    assert d_large > d_small and d_large == pytest.approx(0.2535, rel=1e-3)


def test_step_distances_teacache_polynomial():
    coefficients = TEACACHE_WAN21_COEFFICIENTS["1.3B"]
    e = torch.stack([MODULATIONS[0] * (1 + 0.01 * k) for k in range(5)])
    rels = manual_rel(e)
    expected = [max(0.0, float(np.polyval(coefficients, r))) for r in rels]
    assert step_distances(e, coefficients)[1:] == pytest.approx(expected, rel=1e-9)
    assert all(d > 0 for d in expected)


def tiny_transformer() -> WanVACETransformer3DModel:
    return diffusers_test_transformer(3, (0, 2))


def test_timestep_modulations_match_condition_embedder():
    model = tiny_transformer()
    timesteps = torch.tensor([999, 993, 751, 500, 60])
    modulations = timestep_modulations(model, timesteps)
    assert modulations.shape == (5, 6 * 24) and modulations.dtype == torch.float32
    text = torch.randn(len(timesteps), 7, 32)
    with torch.no_grad():
        _, batched, _, _ = model.condition_embedder(timesteps, text)
        assert torch.equal(modulations, batched)
        # One row at a time, as the pipeline calls it: equal up to matmul rounding (1 row vs 5 rows).
        for i, t in enumerate(timesteps):
            _, single, _, _ = model.condition_embedder(t.reshape(1), text[:1])
            torch.testing.assert_close(modulations[i], single[0], rtol=1e-6, atol=1e-6)


def test_model_family():
    def config(heads, head_dim, layers):
        return {"num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": layers}

    assert model_family(config(12, 128, 30)) == "1.3B"
    assert model_family(config(40, 128, 40)) == "14B"
    assert model_family(config(12, 128, 40)) is None
    assert model_family(tiny_transformer().config) is None
