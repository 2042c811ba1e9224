"""Two-expert pipelines (Wan2.2 VACE-Fun style: `transformer` for high noise, `transformer_2` for low noise) on the
tiny two-expert pipeline (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import demo_clip

import hetcache
from hetcache.config import HetCacheConfig
from hetcache.hooks import engine_of
from hetcache.pipeline import TINY_BOUNDARY_RATIO, build_tiny_random_pipeline, preview_timesteps

STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_random_pipeline(two_experts=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def clip():
    return demo_clip(frames=9, height=32, width=64)


def run(pipe, clip, steps=STEPS):
    video, mask = clip
    mask_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    return pipe(
        prompt="an empty road", negative_prompt="", video=[Image.fromarray(f) for f in video],
        mask=[Image.fromarray(m) for m in mask_rgb], height=32, width=64, num_frames=9, num_inference_steps=steps,
        guidance_scale=5.0, guidance_scale_2=3.0, generator=torch.Generator().manual_seed(0), output_type="pt",
        max_sequence_length=16,
    ).frames[0]


@pytest.fixture(scope="module")
def reference(pipe, clip):
    return run(pipe, clip)


def switch_step(pipe, steps=STEPS) -> int:
    timesteps = preview_timesteps(pipe.scheduler, steps).tolist()
    return next(i for i, t in enumerate(timesteps) if t < TINY_BOUNDARY_RATIO * 1000)


def test_the_tiny_pipeline_switches_experts_mid_run(pipe):
    switch = switch_step(pipe)
    assert 0 < switch < STEPS and hetcache.expert_switch(pipe, STEPS) == switch
    assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)


def test_all_full_plan_is_the_stock_pipeline_and_disable_restores_it(pipe, clip, reference):
    hetcache.enable(pipe, HetCacheConfig(delta=0.0, step_fraction=1.0))
    out = run(pipe, clip)
    stats = hetcache.stats(pipe)
    hetcache.disable(pipe)
    assert torch.equal(out, reference)
    assert stats.plan == "F" * STEPS and len(stats.experts) == 2
    assert engine_of(pipe.transformer) is None and engine_of(pipe.transformer_2) is None
    assert torch.equal(run(pipe, clip), reference)


def test_each_expert_runs_its_own_steps_with_its_own_caches(pipe, clip):
    switch = switch_step(pipe)
    plan = ("F" + "P" * (switch - 1) + "F" + "PR" * STEPS)[:STEPS - 1] + "F"
    hetcache.enable(pipe, HetCacheConfig(plan=plan, margin=1))
    first, second = engine_of(pipe.transformer), engine_of(pipe.transformer_2)
    seen = {}
    original = first.drop_caches

    def dropped():
        seen["cond_residual_before_drop"] = first.branches["cond"].cache.residual is not None
        original()
        seen["after"] = first.branches["cond"].cache.residual
    first.drop_caches = dropped
    out = run(pipe, clip)
    stats = hetcache.stats(pipe)
    hetcache.disable(pipe)
    assert torch.isfinite(out).all()
    assert stats.plan == plan
    one, two = stats.experts
    assert one.plan == plan[:switch] and two.plan == plan[switch:]
    assert one.branches == {"cond": plan[:switch], "uncond": plan[:switch]}
    assert stats.flops == one.flops + two.flops and stats.dense_flops == one.dense_flops + two.dense_flops
    assert stats.rows == one.rows + two.rows
    assert seen == {"cond_residual_before_drop": True, "after": None}  # freed when the second expert started
    assert second is not first


def test_a_plan_that_reuses_right_after_the_switch_is_refused(pipe, clip):
    switch = switch_step(pipe)
    plan = "F" * switch + "R" + "F" * (STEPS - switch - 1)
    with pytest.raises(ValueError, match=f"step {switch}, where the second expert starts"):
        hetcache.plan_for(pipe, STEPS, HetCacheConfig(plan=plan))
    hetcache.enable(pipe, HetCacheConfig(plan=plan))
    with pytest.raises(ValueError, match="second expert starts"):
        run(pipe, clip)
    hetcache.disable(pipe)


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_budget_plans_start_each_expert_full_and_the_preview_shows_it(pipe, clip, budget):
    config = HetCacheConfig(budget=budget, margin=1, warmup_steps=1, step_fraction=1.0)
    letters = hetcache.plan_for(pipe, STEPS, config, mask=torch.from_numpy(clip[1]), text_len=16)
    switch = hetcache.expert_switch(pipe, STEPS)
    assert letters[0] == "F" and letters[switch] == "F"
    hetcache.enable(pipe, config)
    run(pipe, clip)
    stats = hetcache.stats(pipe)
    hetcache.disable(pipe)
    assert stats.plan == letters and stats.experts[1].plan[0] == "F"


def test_baselines_keep_state_per_expert(pipe, clip):
    hetcache.enable(pipe, hetcache.method_config("adacache"))
    out = run(pipe, clip)
    stats = hetcache.stats(pipe)
    hetcache.disable(pipe)
    assert torch.isfinite(out).all() and len(stats.experts) == 2 and len(stats.plan) == STEPS
    switch = switch_step(pipe)
    assert stats.experts[1].plan[0] == "F" and len(stats.experts[0].plan) == switch


def test_bare_transformer_preview_uses_the_720p_flow_shift():
    """A plan preview on a bare transformer takes the recipe's scheduler for the mask's size: flow shift 5.0 at
    720x1280 (3.0 at 480p), so thresholds see the timesteps the real run will have."""
    from hetcache import plan
    from hetcache.pipeline import flow_scheduler

    pipe = build_tiny_random_pipeline()
    model = pipe.transformer
    config = HetCacheConfig(delta=0.3, margin=1)
    def planned(shift: float) -> str:
        return plan.plan_from_distances(
            plan.model_distances(model, preview_timesteps(flow_scheduler(shift), 30)), 0.3, kappa=config.kappa,
            warmup_steps=config.warmup_steps, max_reuse=config.max_reuse, refresh_every=config.refresh_every)

    assert planned(5.0) != planned(3.0)  # the shift matters to the plan, so the check below can fail
    for height, width, shift in ((720, 1280, 5.0), (480, 832, 3.0)):
        mask = torch.zeros(5, height, width, dtype=torch.bool)
        mask[:, : height // 4] = True
        assert hetcache.plan_for(model, 30, config, mask=mask) == planned(shift)
    assert plan.model_family({"num_attention_heads": 40, "attention_head_dim": 128, "num_layers": 40}) == "14B"
