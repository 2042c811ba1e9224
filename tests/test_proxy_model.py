"""The shipped proxy model: its size, its loading path, and the quality HetCache keeps on it.

The floors come from docs/PROXY.md (measured on 8 held-out clips with `python -m hetcache.proxy.report`), with
margin: they catch a broken cache or a broken model, not run-to-run noise.
"""

from __future__ import annotations

import numpy as np
import pytest

import hetcache
from hetcache.metrics import psnr
from hetcache.pipeline import PROXY, load_pipeline, proxy_folder, run_edit
from hetcache.proxy.architecture import FRAMES, HEIGHT, TRANSFORMER_CONFIG, VAE_CONFIG, WIDTH
from hetcache.proxy.quality import EDIT_PROMPT, held_out_clips, mask_psnr

STEPS = 20
# PSNR (dB) inside the mask of HetCache's fast preset against the full-compute output: the lowest of the 8
# held-out clips of docs/PROXY.md (33.7 with the presets' F/P family; 29.3 with the earlier F/P/R presets).
FAST_VS_FULL_FLOOR = 26.0
# The full-compute proxy must beat a flat fill with the visible pixels' mean colour inside the mask (measured on
# this clip: 20.38 dB against 18.79; the median-fill baseline scores 21.97 here, see docs/PROXY.md).


@pytest.fixture(scope="module")
def proxy():
    return load_pipeline(PROXY, "cpu", "fp32", height=HEIGHT, width=WIDTH)


def test_the_proxy_ships_within_its_size_limits(proxy):
    parameters = sum(p.numel() for module in (proxy.vae, proxy.transformer, proxy.text_encoder)
                     for p in module.parameters())
    assert parameters <= 40_000_000
    weights = sum(path.stat().st_size for path in proxy_folder().rglob("*.safetensors"))
    assert weights <= 80 * 2**20
    assert {key: proxy.transformer.config[key] for key in TRANSFORMER_CONFIG} == {
        key: list(value) if isinstance(value, tuple) else value for key, value in TRANSFORMER_CONFIG.items()
    }
    assert {key: proxy.vae.config[key] for key in VAE_CONFIG} == VAE_CONFIG
    assert len(proxy.vae.config.latents_mean) == VAE_CONFIG["z_dim"] and min(proxy.vae.config.latents_std) > 0


def test_hetcache_fast_keeps_the_proxy_quality(proxy):
    clip = held_out_clips(1, FRAMES, HEIGHT, WIDTH)[0]
    full = run_edit(proxy, clip.video, clip.mask, EDIT_PROMPT, steps=STEPS, guidance=1.0).frames
    hetcache.enable(proxy, hetcache.HetCacheConfig.fast())
    try:
        fast = run_edit(proxy, clip.video, clip.mask, EDIT_PROMPT, steps=STEPS, guidance=1.0).frames
        plan = hetcache.stats(proxy).plan
    finally:
        hetcache.disable(proxy)
    assert "P" in plan and set(plan) <= set("FP")  # PARTIAL steps really skipped work; the presets reuse no step
    assert psnr(fast, full, clip.mask) >= FAST_VS_FULL_FLOOR
    mean_colour = clip.video[~clip.mask].mean(axis=0).round().astype(np.uint8)
    flat = np.where(clip.mask[..., None], mean_colour, clip.video)
    assert mask_psnr(full, clip) > mask_psnr(flat, clip)
    assert not np.array_equal(fast, full)
