"""The proxy's training code: generated scenes, the conditioning it trains on, the baseline and a tiny run."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from hetcache.pipeline import build_tiny_random_pipeline, load_pipeline, run_edit
from hetcache.proxy.architecture import control_latents
from hetcache.proxy.export import export_proxy
from hetcache.proxy.quality import held_out_clips, median_fill, to_uint8
from hetcache.proxy.scenes import (FILL_VALUE, MASK_AREA, _render_backgrounds, generate_scenes, random_masks,
                                   removal_scene)
from hetcache.proxy.train import PROBE_STEPS, WARMUP_STEPS, TrainConfig, learning_rate, noise_levels, run_stage, train


def scenes(seed: int, batch: int = 16, frames: int = 9, size: int = 64):
    return generate_scenes(batch, frames, size, size, torch.Generator().manual_seed(seed))


def test_scenes_hide_the_mask_with_grey_and_keep_the_rest():
    batch = scenes(0)
    assert batch.video.shape == batch.target.shape == (16, 3, 9, 64, 64)
    assert batch.mask.shape == (16, 1, 9, 64, 64) and batch.mask.dtype == torch.bool
    assert batch.target.min() >= -1 and batch.target.max() <= 1
    hidden = batch.mask.expand_as(batch.video)
    assert torch.equal(batch.video[hidden], torch.full_like(batch.video[hidden], FILL_VALUE))
    assert torch.equal(batch.video[~hidden], batch.target[~hidden])
    assert FILL_VALUE == pytest.approx(128 / 255 * 2 - 1)  # what the pipeline makes of uint8 128


def test_scenes_are_reproducible_varied_and_cover_the_task():
    first, again, other = scenes(1, batch=64), scenes(1, batch=64), scenes(2, batch=64)
    assert torch.equal(first.target, again.target) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.target, other.target)
    area = first.mask.float().mean(dim=(1, 3, 4))  # per clip and frame
    assert area.min() > MASK_AREA[0] * 0.8 and area.max() < MASK_AREA[1] * 1.1
    moving = (first.mask[:, 0, 0] != first.mask[:, 0, -1]).flatten(1).any(1)
    assert 0.2 < moving.float().mean() < 0.8  # static and moving masks both occur
    # The camera alone (before objects and lighting): the first and last frames of most backgrounds differ.
    backgrounds = _render_backgrounds(64, 9, 64, 64, torch.Generator().manual_seed(1), torch.device("cpu"))
    camera_moves = (backgrounds[:, :, 0] - backgrounds[:, :, -1]).abs().mean(dim=(1, 2, 3))
    assert (camera_moves > 0.01).float().mean() > 0.5


def test_masks_stay_inside_the_frame_as_they_move():
    """A mask's centre is kept half its width from the left and right edges and half its height from the top and
    bottom, so a moving mask keeps its area (up to pixel rounding) instead of sliding out of the frame."""
    masks = random_masks(256, 9, 64, 64, torch.Generator().manual_seed(5), torch.device("cpu")).float()
    area = masks.mean(dim=(1, 3, 4))  # per mask and frame
    spread = (area.max(1).values - area.min(1).values) / area.mean(1)
    assert spread.max() < 0.12  # 0.18 when the vertical limit used the half-width


def test_removal_scene_masks_exactly_the_object():
    video, mask, target = removal_scene(9, 64, 64, seed=3)
    changed = (video - target).abs().amax(dim=1, keepdim=True) > 1e-6
    assert changed.any() and not (changed & ~mask).any()
    assert mask.float().mean() < 0.4


def test_control_latents_match_the_pipeline():
    """As `__call__` calls them: no reference images is one empty list per clip."""
    pipe = build_tiny_random_pipeline()
    batch = scenes(3, batch=2, frames=5, size=32)
    control = control_latents(pipe.vae, batch.video, batch.mask)
    for index in range(2):
        video, mask = batch.video[index : index + 1], batch.mask[index : index + 1].float().expand(-1, 3, -1, -1, -1)
        expected = torch.cat(
            [pipe.prepare_video_latents(video, mask, [[]], device="cpu"), pipe.prepare_masks(mask, [[]])], dim=1
        )
        torch.testing.assert_close(control[index : index + 1], expected, rtol=1e-5, atol=1e-5)


def test_median_fill_copies_from_other_frames_and_interpolates_the_rest():
    video = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    video[:, :, :4] = 40
    video[:, :, 4:] = 200
    video[:, 0, 0] = np.array([10, 20, 30, 250, 60])[:, None]
    mask = np.zeros((5, 8, 8), dtype=bool)
    mask[:2, 0, 0] = True  # visible in frames 2-4: values 30, 250, 60 -> median 60
    mask[:, 3:5, 3:5] = True  # hidden in every frame, between the 40 and 200 halves
    filled = median_fill(video, mask)
    assert np.array_equal(filled[~mask], video[~mask])
    assert (filled[:2, 0, 0] == 60).all()
    hole = filled[:, 3:5, 3:5].astype(int)
    assert hole.min() >= 40 and hole.max() <= 200 and hole[:, :, 0].mean() < hole[:, :, 1].mean()


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert learning_rate(0, 1000, 1.0) == pytest.approx(1 / WARMUP_STEPS)
    assert learning_rate(WARMUP_STEPS, 1000, 1.0) == pytest.approx(1.0)
    assert learning_rate(1000, 1000, 1.0) == pytest.approx(0.1)
    assert learning_rate(50, None, 1.0) == pytest.approx(51 / WARMUP_STEPS)


def test_a_timed_stage_stops_at_its_deadline_before_the_probe_ends():
    def slow_step(step, lr):
        time.sleep(0.01)
        return torch.tensor(1.0)

    log = run_stage("slow", slow_step, None, 0.05, 1.0, torch.device("cpu"), log_every=1000)
    assert 0 < log.steps < PROBE_STEPS[1] and log.planned_steps == log.steps


def test_noise_levels_follow_the_samplers_shift():
    plain = noise_levels(4096, 1.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    shifted = noise_levels(4096, 3.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(plain, torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0))))
    # The same draws, moved up by the schedule's shift: 0.5 -> 0.75, order kept, still inside (0, 1).
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert (shifted > plain).all() and shifted.max() < 1 and shifted.min() > 0
    assert 0.7 < shifted.median() < 0.8 and 0.45 < plain.median() < 0.55


@pytest.mark.usefixtures("one_thread")
def test_training_goes_on_uncompiled_when_compiling_fails(tmp_path, monkeypatch):
    def failing_compile(module):
        def broken(**kwargs):
            raise RuntimeError("no compiler here")
        return broken

    monkeypatch.setattr(torch, "compile", failing_compile)
    config = TrainConfig(frames=5, height=32, width=32, vae_steps=0, dit_steps=2, dit_batch=2, pool=2, refresh=1,
                         refresh_every=1, stats_clips=2, eval_clips=0, log_every=1, compile=True, sigma_shift=3.0)
    log = train(config, tmp_path / "run", torch.device("cpu"))
    assert log["transformer"]["steps"] == 2
    assert log["transformer"]["extra"]["compiled"] is False
    assert "no compiler here" in log["transformer"]["extra"]["compile_error"]


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_training_run_exports_a_loadable_pipeline(tmp_path):
    config = TrainConfig(frames=5, height=32, width=32, vae_steps=2, vae_batch=2, vae_frames=5, vae_size=32,
                         dit_steps=2, dit_batch=2, pool=2, refresh=1, refresh_every=1, stats_clips=2, eval_clips=1, eval_steps=2,
                         log_every=1)
    train(config, tmp_path / "run", torch.device("cpu"))
    saved = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert saved["vae"]["steps"] == 2 and saved["transformer"]["steps"] == 2
    assert [row[0] for row in saved["transformer"]["curve"]] == [1, 2]
    assert saved["transformer"]["extra"]["pool_clips"] == 2
    assert len(saved["latents_mean"]) == 32 and min(saved["latents_std"]) > 0
    assert set(saved["held_out"]) >= {"mean_model", "mean_median_fill"}

    # A warm start with vae_steps=0 keeps the VAE and its latent statistics and trains the transformer on.
    again = dataclasses.replace(config, vae_steps=0, dit_steps=1, eval_clips=0)
    resumed = train(again, tmp_path / "resumed", torch.device("cpu"), init=tmp_path / "run")
    assert resumed["latents_mean"] == saved["latents_mean"] and resumed["transformer"]["steps"] == 1
    assert (tmp_path / "run" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "resumed" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    export_proxy(tmp_path / "run", tmp_path / "proxy")
    pipe = load_pipeline(str(tmp_path / "proxy"), "cpu", "fp32", height=32, width=32)
    assert pipe.vae.config.latents_mean == saved["latents_mean"]
    for part in ("vae", "transformer"):  # the shipped configs name no path of the training machine
        assert json.loads((tmp_path / "proxy" / part / "config.json").read_text())["_name_or_path"] == "proxy"
    clip = held_out_clips(1, frames=5, height=32, width=32)[0]
    result = run_edit(pipe, clip.video, clip.mask, "remove the object", steps=2, guidance=1.0)
    assert result.frames.shape == clip.target.shape


def test_held_out_clips_are_fixed_and_hide_their_mask():
    first, again = held_out_clips(2, frames=5, height=32, width=32), held_out_clips(2, frames=5, height=32, width=32)
    assert np.array_equal(first[1].target, again[1].target) and not np.array_equal(first[0].target, first[1].target)
    assert (first[0].video[first[0].mask] == 128).all()
    assert to_uint8(torch.full((3, 1, 1, 1), FILL_VALUE))[0, 0, 0].tolist() == [128, 128, 128]
