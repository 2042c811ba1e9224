"""The baseline caches on tiny random WanVACE models (float32, CPU).

Exact equalities where promised: every method under `never_skip=True` reproduces `full` bitwise through the
pipeline, reuse never crosses CFG branches, `disable` restores the stock forward. Tolerances (1e-5) only where a
cached residual is added back (h + (out - h) rounds).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import box_mask, tiny_inputs, tiny_transformer

import hetcache
from hetcache import flops
from tiny_models import demo_clip
from hetcache.core import HOOK_NAME
from hetcache.errors import UserError
from hetcache.methods import (
    METHOD_NAMES,
    check_options,
    inference_steps,
    method_config,
    method_flag,
    method_options,
    unavailable_reason,
)
from hetcache.methods import base
from hetcache.methods.adacache import CODEBOOK_30_STEPS, CODEBOOK_100_STEPS, AdaCacheConfig, cache_rate
from hetcache.methods.fastcache import FastCacheConfig, chi2_ratio
from hetcache.methods.pab import PABConfig, broadcast_steps
from hetcache.methods.teacache import teacache_config
from hetcache.pipeline import build_tiny_random_pipeline

STEPS = 6
RUNNABLE = [name for name in METHOD_NAMES if name != "cache-dit"]
GRID = (3, 4, 6)


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_random_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def edit_inputs():
    video, mask = demo_clip(frames=9, height=32, width=64)
    mask_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    return [Image.fromarray(f) for f in video], [Image.fromarray(m) for m in mask_rgb]


def run(pipe, edit_inputs, steps: int = STEPS) -> torch.Tensor:
    frames, masks = edit_inputs
    return pipe(
        prompt="an empty road", negative_prompt="", video=frames, mask=masks, height=32, width=64, num_frames=9,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
        output_type="pt", max_sequence_length=16,
    ).frames[0]


@pytest.fixture(scope="module")
def reference(pipe, edit_inputs):
    return run(pipe, edit_inputs)


def run_method(pipe, edit_inputs, config) -> tuple[torch.Tensor, hetcache.CacheStats]:
    steps = inference_steps(config, STEPS)
    if hasattr(config, "prepare"):
        config.prepare(pipe.transformer, steps, lambda: run(pipe, edit_inputs, steps))
    hetcache.enable(pipe, config)
    try:
        return run(pipe, edit_inputs, steps), hetcache.stats(pipe)
    finally:
        hetcache.disable(pipe)


def hetcache_hooks(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(HOOK_NAME) is not None]


@pytest.mark.parametrize("name", RUNNABLE)
def test_never_skip_reproduces_full_exactly(pipe, edit_inputs, reference, name):
    out, stats = run_method(pipe, edit_inputs, method_config(name, never_skip=True))
    assert torch.equal(out, reference)
    assert stats.plan == "F" * STEPS
    assert stats.branches == {"cond": "F" * STEPS, "uncond": "F" * STEPS}


@pytest.mark.parametrize("name", RUNNABLE)
def test_every_method_runs_and_disable_restores_stock(pipe, edit_inputs, reference, name):
    # step_fraction 1: on 6 steps the presets' budgets would otherwise be met by fewer solver steps, all FULL.
    # AdaCache's rates scale with the step count (at 6 steps every paper rate rounds to 1): scaled up here.
    overrides = {"teacache": dict(delta=1e3, warmup_steps=1), "hetcache-slow": dict(step_fraction=1.0),
                 "hetcache-fast": dict(step_fraction=1.0), "hetcache": dict(step_fraction=1.0),
                 "adacache": {"codebook_scale": 5.0}}.get(name, {})
    config = method_config(name, **overrides)
    out, stats = run_method(pipe, edit_inputs, config)
    steps = inference_steps(config, STEPS)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert len(stats.plan) == steps and set(stats.plan) <= set("FPR")
    assert stats.branches["cond"] == stats.plan and len(stats.branches["uncond"]) == steps
    assert 0 < stats.flops <= stats.dense_flops * (1 + 1e-12)
    if name != "full" and name != "fewer-steps":
        assert set(stats.plan) - {"F"}, f"{name} reused nothing on the tiny model: the test checks nothing"
        assert stats.flops < stats.dense_flops
    assert hetcache_hooks(pipe.transformer) == []
    assert not pipe.transformer.is_cache_enabled
    assert torch.equal(run(pipe, edit_inputs), reference)


def test_fewer_steps_runs_the_fraction(pipe, edit_inputs):
    config = method_config("fewer-steps", steps_fraction=0.5)
    assert inference_steps(config, 50) == 25 and inference_steps(config, 1) == 1
    _, stats = run_method(pipe, edit_inputs, config)
    assert stats.plan == "FFF"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown method 'nope'.*fastcache"):
        method_config("nope")


def test_cache_dit_is_reported_unavailable_when_missing():
    if importlib.util.find_spec("cache_dit") is not None:
        pytest.skip("cache-dit is installed here")
    assert "not installed" in unavailable_reason("cache-dit")
    assert unavailable_reason("pab") is None


# ------------------------------------------------------------------------------------------------ direct calls
@pytest.fixture
def model():
    return tiny_transformer(num_layers=4, vace_layers=(0, 2))


def call(model, inputs, t, branch):
    with torch.no_grad(), model.cache_context(branch):
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


def enable(model, name):
    """Direct-call settings under which the third cond call below reuses something."""
    if name == "teacache":
        config = teacache_config(delta=1e9, warmup_steps=1)
        return hetcache.enable(model, config, mask=box_mask(GRID, slice(1, 3), slice(2, 4)),
                               timesteps=torch.tensor([900.0, 700.0, 500.0]))
    config = {
        "pab": PABConfig(timestep_window=(0.0, 1000.0)),
        "adacache": AdaCacheConfig(codebook={1.0: 8}),
        "fastcache": FastCacheConfig(max_change=10.0),
    }[name]
    return hetcache.enable(model, config)


SEQUENCE = (900.0, 700.0, 500.0)


@pytest.mark.parametrize("name", ["teacache", "pab", "adacache", "fastcache"])
def test_cond_and_uncond_never_share_a_cache(model, name):
    """cond / uncond / cond ...: each reused cond output equals that of a cond-only sequence."""
    cond = tiny_inputs(0)
    uncond = dict(cond, encoder_hidden_states=torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(9)))
    enable(model, name)
    both = []
    for t in SEQUENCE:
        both.append(call(model, cond, t, "cond"))
        call(model, uncond, t, "uncond")
    letters = hetcache.stats(model).branches["cond"]
    enable(model, name)
    alone = [call(model, cond, t, "cond") for t in SEQUENCE]
    assert set(letters) - {"F"}, f"{name} reused nothing: {letters}"
    for a, b in zip(both, alone):
        assert torch.equal(a, b)
    hetcache.disable(model)


def test_pab_broadcast_on_identical_inputs_is_exact(model):
    x = tiny_inputs(1)
    hetcache.enable(model, PABConfig(timestep_window=(0.0, 1000.0)))
    first = call(model, x, 600.0, "cond")
    second = call(model, x, 600.0, "cond")
    assert hetcache.stats(model).plan == "FP"
    assert torch.equal(first, second)
    hetcache.disable(model)


def count_ffn_calls(model, fn):
    calls = []
    handles = [b.ffn.register_forward_hook(lambda *a: calls.append(1)) for b in (*model.blocks, *model.vace_blocks)]
    try:
        return fn(), len(calls)
    finally:
        for handle in handles:
            handle.remove()


def test_adacache_reuse_adds_cached_residuals_and_runs_no_block(model):
    x = tiny_inputs(2)
    hetcache.enable(model, AdaCacheConfig(codebook={1.0: 8}))
    call(model, x, 500.0, "cond")
    computed = call(model, x, 500.0, "cond")
    reused, ffn_calls = count_ffn_calls(model, lambda: call(model, x, 500.0, "cond"))
    assert hetcache.stats(model).plan == "FFR"
    assert ffn_calls == 0
    assert (reused - computed).abs().max() <= 1e-5
    hetcache.disable(model)


def test_fastcache_static_tokens_reuse_and_motion_tokens_compute(model):
    x = tiny_inputs(3)
    hetcache.enable(model, FastCacheConfig(block_cache=False))
    first = call(model, x, 500.0, "cond")
    static, ffn_calls = count_ffn_calls(model, lambda: call(model, x, 500.0, "cond"))
    assert ffn_calls == 0 and (static - first).abs().max() <= 1e-5
    moved = dict(x, hidden_states=x["hidden_states"].clone())
    moved["hidden_states"][:, :, 0, :2, :2] += 1.0  # the latent patch of token 0 only
    call(model, moved, 500.0, "cond")
    stats = hetcache.stats(model)
    assert stats.plan == "FRP"
    assert stats.rows == [72, 0, 1]
    hetcache.disable(model)


def test_disable_removes_every_hook(model):
    x = tiny_inputs(4)
    expected = call(model, x, 500.0, "cond")
    for name in RUNNABLE:
        config = method_config(name)
        if name == "diffusers-magcache":
            config = method_config(name, mag_ratios=[1.0] * 3, num_inference_steps=3)
        kwargs = {}
        if name in ("teacache", "hetcache-slow", "hetcache-fast", "hetcache"):
            kwargs = {"mask": box_mask(GRID, slice(1, 3), slice(2, 4)), "timesteps": torch.tensor([900.0, 500.0])}
        hetcache.enable(model, config, **kwargs)
        call(model, x, 900.0, "cond")
        call(model, x, 500.0, "cond")
        hetcache.disable(model)
        assert hetcache_hooks(model) == [], name
        assert not model.is_cache_enabled, name
        assert torch.equal(call(model, x, 500.0, "cond"), expected), name


# ------------------------------------------------------------------------------------------------ pieces
def test_teacache_is_an_engine_plan_without_partial_steps(model):
    config = teacache_config(delta=1e9, warmup_steps=1, max_reuse=2)
    assert config.kappa == 1.0 and config.refresh_every == 1
    letters = hetcache.plan_for(model, 30, config)
    assert letters == "FRRFRRFRRFRRFRRFRRFRRFRRFRRFRF"
    assert method_config("teacache", never_skip=True).delta == 0.0


def test_adacache_codebooks_and_rates():
    assert AdaCacheConfig().codebook_for(30) == CODEBOOK_30_STEPS
    assert AdaCacheConfig().codebook_for(100) == CODEBOOK_100_STEPS
    # rates count steps of the schedule the codebook was made for: rescaled to the run's step count
    assert AdaCacheConfig().codebook_for(50) == {0.03: 6, 0.05: 5, 0.07: 4, 0.09: 3, 0.11: 2, 1.00: 2}
    assert AdaCacheConfig().codebook_for(20) == {0.08: 4, 0.16: 3, 0.24: 3, 0.32: 2, 0.40: 1, 1.00: 1}
    assert AdaCacheConfig(codebook_scale=0.5).codebook_for(100) == {0.03: 6, 0.05: 5, 0.07: 4, 0.09: 3, 0.11: 2,
                                                                    1.00: 2}
    assert AdaCacheConfig(codebook={0.1: 4, 1.0: 2}, codebook_scale=2).codebook_for(20) == {0.1: 8, 1.0: 4}
    assert CODEBOOK_100_STEPS == {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3}
    assert cache_rate(0.01, CODEBOOK_100_STEPS) == 12
    assert cache_rate(0.03, CODEBOOK_100_STEPS) == 10  # thresholds are strict upper bounds
    assert cache_rate(0.1, CODEBOOK_100_STEPS) == 4
    assert cache_rate(5.0, CODEBOOK_100_STEPS) == 3


def test_fastcache_chi_square_bound():
    assert chi2_ratio(100, 0.05) == pytest.approx(124.342 / 100, abs=2e-3)  # table value
    assert chi2_ratio(10**7, 0.05) == pytest.approx(1.0, abs=1e-3)


def test_pab_schedule_follows_ranges_and_window():
    config = PABConfig(self_attention_range=2, cross_attention_range=3, timestep_window=(100.0, 800.0))
    steps = broadcast_steps(config, [900.0, 700.0, 600.0, 500.0, 400.0, 300.0, 50.0])
    assert [s["self"] for s in steps] == [False, True, False, True, False, True, False]
    assert [s["cross"] for s in steps] == [False, True, True, False, True, True, False]


def test_cost_helpers_add_up_to_a_block():
    shape = flops.ModelShape.from_config(tiny_transformer().config)
    rows, text = 72, 8
    parts = (base.self_attention_flops(shape, rows, rows) + base.cross_attention_flops(shape, rows, text)
             + 4 * rows * shape.dim * shape.ffn_dim)
    assert parts == flops.block_flops(shape, rows, rows, text, text_kv=True)


def test_config_validation():
    with pytest.raises(ValueError):
        PABConfig(self_attention_range=0)
    with pytest.raises(ValueError):
        FastCacheConfig(warmup_steps=0)
    with pytest.raises(ValueError):
        AdaCacheConfig(codebook={0.1: 0})


# ------------------------------------------------------------------------------------------------ like for like
def test_teacache_warmup_keeps_the_recipes_share_of_the_steps():
    assert method_config("teacache").warmup_steps == 5  # no step count: the recipe's own
    assert [method_config("teacache", steps=s).warmup_steps for s in (4, 20, 50, 100)] == [1, 2, 5, 10]
    assert method_config("teacache", steps=20, warmup_steps=4).warmup_steps == 4  # a user's value wins


def test_cache_dit_options_fit_small_models_and_short_runs():
    from hetcache.methods.peers import fitted_options

    assert fitted_options({}, 30, 50) == {"Fn_compute_blocks": 8, "max_warmup_steps": 8}  # cache-dit's defaults
    assert fitted_options({}, 3, 4) == {"Fn_compute_blocks": 2, "max_warmup_steps": 3}
    assert fitted_options({"Bn_compute_blocks": 1}, 3, 20)["Fn_compute_blocks"] == 1
    assert fitted_options({"Fn_compute_blocks": 4, "residual_diff_threshold": 0.2}, 3, 20) == {
        "Fn_compute_blocks": 4, "max_warmup_steps": 8, "residual_diff_threshold": 0.2}
    config = method_config("cache-dit")
    config.prepare(tiny_transformer(num_layers=3), 6, lambda: None)
    assert config.options == {"Fn_compute_blocks": 2, "max_warmup_steps": 5}


def test_flags_name_the_methods_known_to_be_wrong_on_vace_and_the_deviation():
    assert method_flag("diffusers-fbc").startswith("wrong on VACE") and method_flag("diffusers-magcache").startswith(
        "wrong on VACE")
    assert method_flag("fastcache-style").startswith("deviation")
    assert [name for name in METHOD_NAMES if method_flag(name)] == ["fastcache-style", "diffusers-fbc",
                                                                    "diffusers-magcache"]


def test_method_options_are_checked_against_each_config():
    assert "delta" in method_options("teacache") and "budget" in method_options("hetcache")
    assert method_options("diffusers-fbc") == ("threshold",) and method_options("cache-dit") is None
    assert check_options("pab", {"self_attention_range": 4}) == {"self_attention_range": 4}
    with pytest.raises(UserError, match="unknown option 'dleta' for teacache: use one of .*delta"):
        check_options("teacache", {"dleta": 0.1})
    with pytest.raises(UserError, match="unknown option 'treshold' for diffusers-fbc: use one of threshold"):
        check_options("diffusers-fbc", {"treshold": 0.1})
    with pytest.raises(UserError, match="hetcache-fast: .*budget and delta"):
        check_options("hetcache-fast", {"delta": 0.1, "budget": 0.3})
    with pytest.raises(UserError, match="broadcast ranges must be >= 1"):
        check_options("pab", {"self_attention_range": 0})
    assert check_options("diffusers-magcache", {"threshold": 0.1}) == {"threshold": 0.1}  # ratios come later


def test_hetcache_is_the_engine_with_every_knob_and_the_presets_take_a_delta():
    assert method_config("hetcache").budget == 0.42 and method_config("hetcache", budget=0.6).budget == 0.6
    slow = method_config("hetcache-slow", delta=0.2)
    assert (slow.delta, slow.budget) == (0.2, None)
