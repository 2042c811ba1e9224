"""HetCacheConfig: one source decides the plan (a second one is refused), and the presets take a user's delta."""

from __future__ import annotations

import dataclasses

import pytest

from hetcache.config import FAST_BUDGET, SLOW_BUDGET, HetCacheConfig


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"delta": 0.2, "budget": 0.4}, "budget and delta"),
        ({"plan": "FFRF", "budget": 0.4}, "plan and budget"),
        ({"plan": "FFRF", "delta": 0.1}, "plan and delta"),
    ],
)
def test_two_sources_of_the_plan_are_refused(options, named):
    with pytest.raises(ValueError, match=f"{named} each decide the step plan: give only one of them"):
        HetCacheConfig(**options)


def test_replacing_one_source_by_another_without_clearing_it_is_refused():
    with pytest.raises(ValueError, match="budget and delta"):
        dataclasses.replace(HetCacheConfig.fast(), delta=0.2)
    assert dataclasses.replace(HetCacheConfig.fast(), delta=0.2, budget=None).delta == 0.2


def test_presets_plan_by_a_users_delta_or_plan_instead_of_their_budget():
    assert (HetCacheConfig.slow().budget, HetCacheConfig.fast().budget) == (SLOW_BUDGET, FAST_BUDGET)
    slow = HetCacheConfig.slow(delta=0.2)
    assert (slow.delta, slow.budget, slow.plan) == (0.2, None, None)
    fast = HetCacheConfig.fast(plan="ffrf")
    assert (fast.plan, fast.budget, fast.delta) == ("FFRF", None, None)
    assert HetCacheConfig.fast(budget=0.5).budget == 0.5
    assert HetCacheConfig.fast(budget=None).budget == FAST_BUDGET  # None means "the preset's own"
    assert HetCacheConfig.slow(delta=0.2, margin=5).margin == 5
    with pytest.raises(ValueError, match="budget and delta"):
        HetCacheConfig.slow(delta=0.2, budget=0.5)


def test_presets_are_the_measured_family_and_overrides_win():
    """Both presets plan FULL and PARTIAL steps only, hold, over at most 3/4 of the solver steps; any field given
    replaces the family's."""
    for preset in (HetCacheConfig.slow(), HetCacheConfig.fast()):
        assert (preset.max_reuse, preset.reuse, preset.max_step_fraction) == (0, "hold", 0.75)
    assert HetCacheConfig.fast(max_reuse=3, max_step_fraction=None).max_reuse == 3
    assert HetCacheConfig.fast(max_step_fraction=None).max_step_fraction is None
    assert HetCacheConfig.slow(delta=0.2).max_reuse == 0


def test_no_source_falls_back_to_the_slow_budget():
    assert HetCacheConfig().budget == SLOW_BUDGET and HetCacheConfig(delta=0.0).budget is None
