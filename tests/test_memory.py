"""Cache memory: the estimate against what the engine holds, and where a cache fits (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import demo_clip

import hetcache
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.memory import FIT_MARGIN, estimate_memory, fit
from hetcache.pipeline import build_tiny_random_pipeline

GIB = 2**30


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_random_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("config", [
    HetCacheConfig(plan="FPRP", margin=1),
    HetCacheConfig(plan="FPRP", margin=1, reuse="quadratic"),
    HetCacheConfig(plan="FPRP", margin=1, cache_dtype=torch.float8_e4m3fn),
    HetCacheConfig(plan="FRRF", margin=1),  # no PARTIAL step: the residual only
], ids=["hold", "quadratic", "float8", "no-partial"])
def test_estimate_matches_the_bytes_the_engine_holds(pipe, config):
    video, mask = demo_clip(frames=9, height=32, width=64)
    mask_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    hetcache.enable(pipe, config)
    pipe(prompt="a road", negative_prompt="", video=[Image.fromarray(f) for f in video],
         mask=[Image.fromarray(m) for m in mask_rgb], height=32, width=64, num_frames=9, num_inference_steps=4,
         guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=16)
    measured = hetcache.stats(pipe).cache_bytes
    hetcache.disable(pipe)
    estimate = estimate_memory(pipe.transformer, 9, 32, 64, config, dtype=torch.float32, text_len=16)
    assert measured > 0 and abs(estimate.total - measured) <= 0.05 * measured


def test_estimate_at_the_real_sizes():
    """The 1.3B model at 81 frames of 480p: 45 layers x 32,760 tokens x 1,536 x 2 (K, V) x 2 bytes x 2 branches."""
    wan = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
               vace_layers=list(range(0, 30, 2)), text_dim=4096, in_channels=16, vace_in_channels=96,
               out_channels=16, patch_size=(1, 2, 2), freq_dim=256)
    estimate = estimate_memory(wan, 81, 480, 832, HetCacheConfig.fast())
    assert estimate.tokens == 21 * 30 * 52
    assert estimate.kv_bytes == 2 * 45 * 32760 * 1536 * 2 * 2
    assert estimate_memory(wan, 81, 480, 832, HetCacheConfig(budget=0.3, cache_dtype=torch.float8_e4m3fn)).kv_bytes \
        == estimate.kv_bytes // 2


def test_fit_chooses_the_tier_and_names_the_ways_out():
    estimate = estimate_memory({"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 4,
                                "vace_layers": [0, 2], "text_dim": 32, "in_channels": 16, "vace_in_channels": 96,
                                "out_channels": 16, "patch_size": (1, 2, 2), "freq_dim": 32}, 9, 32, 64)
    need = estimate.total * 1.2
    cuda = torch.device("cuda")  # only compared, never allocated on
    assert fit(estimate, cuda, "auto", device_free=need, host_free=0)[0] == "device"
    assert fit(estimate, cuda, "auto", device_free=0, host_free=need)[0] == "host"
    assert fit(estimate, cuda, "cpu", device_free=need, host_free=need)[0] == "host"
    cache_only = math.ceil(estimate.total * (1 + FIT_MARGIN))  # the cache fits, the forward's own peak does not
    assert estimate.activation_bytes > 0
    assert fit(estimate, cuda, "auto", device_free=cache_only, host_free=need)[0] == "host"
    assert fit(estimate, cuda, "auto", device_free=cache_only + estimate.activation_bytes, host_free=0)[0] == "device"
    with pytest.raises(UserError, match="--cache-device cpu"):
        fit(estimate, cuda, "cuda", device_free=0, host_free=need)
    with pytest.raises(UserError, match="neither.*float8"):
        fit(estimate, cuda, "auto", device_free=0, host_free=0)
    with pytest.raises(UserError, match="fewer --frames"):
        fit(estimate, torch.device("cpu"), "auto", device_free=0, host_free=0)
