"""Plans over fewer solver steps (S' of the S asked for), joint budget solving, and config files (CPU)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import demo_clip

import hetcache
from hetcache import plan
from hetcache.config import HetCacheConfig
from hetcache.methods import inference_steps, method_config
from hetcache.pipeline import build_tiny_random_pipeline, run_edit
from hetcache.session import pixel_partition

STEPS = 10
TEXT_LEN = 16  # the tiny tokenizer's limit, which the prompt embeddings have


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_random_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def clip():
    video, mask = demo_clip(frames=9, height=32, width=64)
    return video, mask


def run(pipe, clip, steps=STEPS):
    video, mask = clip
    mask_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    return pipe(
        prompt="an empty road", negative_prompt="", video=[Image.fromarray(f) for f in video],
        mask=[Image.fromarray(m) for m in mask_rgb], height=32, width=64, num_frames=9, num_inference_steps=steps,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=16,
    ).frames[0]


def run_with(pipe, clip, config, steps=STEPS):
    hetcache.enable(pipe, config)
    try:
        return run(pipe, clip, steps), hetcache.stats(pipe)
    finally:
        hetcache.disable(pipe)


def test_all_full_plan_over_fewer_steps_is_fewer_steps_bitwise(pipe, clip):
    """S' = S / 2 with only FULL steps is the stock pipeline at S / 2 steps, bit for bit."""
    fewer = method_config("fewer-steps", steps_fraction=0.5)
    expected = run(pipe, clip, inference_steps(fewer, STEPS))
    out, stats = run_with(pipe, clip, HetCacheConfig(step_fraction=0.5, delta=0.0))
    assert torch.equal(out, expected)
    assert stats.plan == "F" * 5 and stats.requested_steps == STEPS
    assert stats.flops_ratio == pytest.approx(0.5)  # against the stock pipeline at the 10 steps asked for


def test_full_steps_at_every_step_are_the_stock_pipeline(pipe, clip):
    expected = run(pipe, clip)
    out, stats = run_with(pipe, clip, HetCacheConfig(step_fraction=1.0, delta=0.0))
    assert torch.equal(out, expected) and stats.plan == "F" * STEPS
    assert torch.equal(run(pipe, clip), expected)  # disable put the scheduler back


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.45])
@pytest.mark.parametrize("max_reuse", [0, 3])
def test_budget_solves_solver_steps_and_letters_jointly(pipe, clip, budget, max_reuse):
    """The run meets the budget (analytic FLOPs against the stock pipeline at S steps), its letters are the ones
    plan_for gave before the run, and S' is the largest step count whose plan fits."""
    config = HetCacheConfig(budget=budget, max_reuse=max_reuse, margin=1, warmup_steps=1)
    mask = torch.from_numpy(clip[1])
    previewed = hetcache.plan_for(pipe, STEPS, config, mask=mask, text_len=TEXT_LEN)
    assert previewed == hetcache.plan_for(pipe, STEPS, config, mask=mask, text_len=TEXT_LEN)  # deterministic
    _, stats = run_with(pipe, clip, config)
    assert stats.plan == previewed and len(previewed) <= STEPS
    partition = pixel_partition(config, mask, (1, 2, 2))
    costs = plan.step_costs(pipe.transformer, partition, config, TEXT_LEN)
    assert plan.plan_cost(previewed, **costs) <= budget * STEPS * costs["full_cost"] * (1 + 1e-9)
    assert stats.flops_ratio <= budget * 1.02  # plus the selection and the text K/V, which plans leave out
    if max_reuse == 0:
        assert "R" not in stats.plan
    if len(previewed) < STEPS:  # one more solver step would not fit
        timesteps = hetcache.pipeline.preview_timesteps(pipe.scheduler, len(previewed) + 1)
        letters, _, notes = plan.resolve_plan(pipe.transformer, config, partition, TEXT_LEN, timesteps=timesteps,
                                              num_steps=len(previewed) + 1, requested_steps=STEPS)
        assert notes and "below what the plan guards allow" in notes[0]


@pytest.mark.parametrize("budget", [0.45, 0.6])
def test_max_step_fraction_caps_the_solver_steps_a_budget_chooses(pipe, budget):
    """With a cap, S' is the largest step count up to the cap whose plan meets the budget. A small box on a wider
    frame makes PARTIAL steps cheap enough that the uncapped solve takes more steps than the cap allows."""
    mask = torch.zeros(9, 64, 128)
    mask[:, 16:32, 32:64] = 1
    free = HetCacheConfig(budget=budget, max_reuse=0, margin=1, warmup_steps=1)
    capped = dataclasses.replace(free, max_step_fraction=0.5)
    unbounded = hetcache.plan_for(pipe, STEPS, free, mask=mask, text_len=TEXT_LEN)
    letters = hetcache.plan_for(pipe, STEPS, capped, mask=mask, text_len=TEXT_LEN)
    most = math.floor(STEPS * max(0.5, budget) + 1e-9)
    assert len(unbounded) > most  # the cap binds
    partition = pixel_partition(capped, mask, (1, 2, 2))
    costs = plan.step_costs(pipe.transformer, partition, capped, TEXT_LEN)
    assert plan.plan_cost(letters, **costs) <= budget * STEPS * costs["full_cost"] * (1 + 1e-9)
    assert len(letters) <= most
    if len(letters) < most:  # the cap's own step count does not fit the budget
        longer = dataclasses.replace(capped, step_fraction=most / STEPS, max_step_fraction=None)
        letters_at_most = hetcache.plan_for(pipe, STEPS, longer, mask=mask, text_len=TEXT_LEN)
        assert plan.plan_cost(letters_at_most, **costs) > budget * STEPS * costs["full_cost"]


def test_a_budget_at_or_above_the_cap_runs_fewer_steps_all_full(pipe, clip):
    """Budget 0.6 over a cap of 0.4: six solver steps, all FULL, the stock pipeline at six steps bitwise."""
    config = HetCacheConfig(budget=0.6, max_step_fraction=0.4, max_reuse=0)
    out, stats = run_with(pipe, clip, config)
    assert stats.plan == "F" * 6
    assert torch.equal(out, run(pipe, clip, 6))
    with pytest.raises(ValueError, match="max_step_fraction"):
        HetCacheConfig(budget=0.3, max_step_fraction=0.0)


def test_the_progress_bar_counts_the_solver_steps_that_run(pipe, clip):
    totals = []
    original = pipe.progress_bar
    pipe.progress_bar = lambda iterable=None, total=None: totals.append(total) or original(iterable, total)
    try:
        _, stats = run_with(pipe, clip, HetCacheConfig(step_fraction=0.5, delta=0.0))
    finally:
        pipe.__dict__.pop("progress_bar", None)
    assert len(stats.plan) == 5 and totals == [5]


def test_run_edit_reports_progress_out_of_the_steps_that_run(pipe, clip):
    calls = []
    hetcache.enable(pipe, HetCacheConfig(step_fraction=0.5, delta=0.0))
    try:
        run_edit(pipe, *clip, "an empty road", steps=STEPS, progress=lambda done, total: calls.append((done, total)))
    finally:
        hetcache.disable(pipe)
    assert calls == [(step, 5) for step in range(1, 6)]


def test_step_fraction_plans_over_the_kept_steps(pipe, clip):
    config = HetCacheConfig(step_fraction=0.6, plan=None, budget=0.4, margin=1)
    letters = hetcache.plan_for(pipe, STEPS, config, mask=torch.from_numpy(clip[1]), text_len=TEXT_LEN)
    _, stats = run_with(pipe, clip, config)
    assert len(letters) == 6 and stats.plan == letters
    assert stats.flops_ratio <= 0.4 + 1e-9 or stats.notes


def test_config_files_round_trip(tmp_path):
    config = HetCacheConfig(budget=0.3, step_fraction=0.5, reuse="quadratic", max_reuse=0, margin=2,
                            cache_dtype=torch.bfloat16)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert HetCacheConfig.from_file(path) == config
    path.write_text(json.dumps({"target": {"flops": 0.3}, "config": config.to_dict()}))  # a calibrate choice
    assert HetCacheConfig.from_file(path) == config
    path.write_text(json.dumps({"budget": 0.3, "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        HetCacheConfig.from_file(path)
    path.write_text(json.dumps({"reuse": "cubic"}))
    with pytest.raises(ValueError, match="reuse"):
        HetCacheConfig.from_file(path)
