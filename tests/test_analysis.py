"""The heterogeneity analysis on tiny random models: the recomputed attention matches the block's own, the plan
signal matches the engine's plan, the probe leaves the output alone, and every output file is written."""

from __future__ import annotations

import dataclasses

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_inputs, tiny_transformer

import hetcache
from hetcache import analysis, plan, tokens
from hetcache.analysis import (
    OUTPUT_FILES,
    accumulated,
    analysis_config,
    analyze_main,
    attach_probe,
    detach_probe,
    mean_attention,
    query_key_value,
)
from tiny_models import demo_clip
from hetcache.errors import UserError
from hetcache.pipeline import load_pipeline, run_edit

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def test_recomputed_queries_and_keys_reproduce_the_blocks_attention():
    model = tiny_transformer()
    attn = model.blocks[-1].attn1
    inputs = tiny_inputs()
    rotary = model.rope(inputs["hidden_states"])
    tokens_in = torch.randn(1, 3 * 4 * 6, attn.inner_dim, generator=torch.Generator().manual_seed(1))
    seen = {}
    handle = attn.to_out[0].register_forward_pre_hook(lambda module, args: seen.update(out=args[0]))
    with torch.no_grad():
        attn(tokens_in, None, None, rotary)
        query, key, value = query_key_value(attn, tokens_in, rotary)
    handle.remove()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [H, N, Dh]
    probabilities = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    expected = (probabilities @ v).transpose(0, 1).flatten(1)  # [N, H * Dh], as the block's output projection sees it
    assert torch.allclose(expected, seen["out"][0], atol=1e-5)
    rows = torch.tensor([0, 5, 7])
    assert torch.allclose(mean_attention(q[:, rows], k), probabilities[:, rows].mean(dim=(0, 1)), atol=1e-6)
    estimate = mean_attention(q, k, max_queries=8)  # evenly spaced queries: still a distribution
    assert float(estimate.sum()) == pytest.approx(1.0, abs=1e-5)


def test_accumulated_replays_the_plan_accumulator():
    distances = [math.inf, 0.3, 0.3, 0.5, 0.2, 0.9]
    letters = plan.plan_from_distances(distances, 1.0, kappa=1.5, warmup_steps=1, max_reuse=3, refresh_every=4)
    assert letters == "FRRPRF"
    assert accumulated(distances, letters)[1:] == pytest.approx([0.3, 0.6, 1.1, 0.2, 1.1])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    from hetcache.video import write_mask_video, write_video

    folder = tmp_path_factory.mktemp("analysis")
    video, mask = demo_clip(frames=9, height=64, width=96)
    video_path = write_video(folder / "clip.mp4", video, 8.0, lossless=True)
    mask_path = write_mask_video(folder / "mask.mp4", mask, 8.0, lossless=True)
    out = folder / "out"
    result = analyze_main(video_path, mask_path, None, "a car on the road", "tiny-random", STEPS, None, None, None,
                          0, 5.0, "cpu", "fp32", out, preset="hetcache-fast")
    return result, out, mask


def test_every_file_is_written(analysed):
    result, out, _ = analysed
    for name in OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert json.loads((out / "analysis.json").read_text()) == result
    for name in ("analysis.png", "mass_by_class.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 300


def test_analysis_json_records_every_step_of_the_cond_branch(analysed):
    result, _, _ = analysed
    assert result["schema"] == "hetcache-analysis/1" and result["branch"] == "cond"
    assert result["grid"] == [3, 4, 6] and result["sampled_frames"] == [0, 1, 2]
    assert len(result["steps"]) == STEPS  # one record per step although CFG makes two calls per step
    assert result["query_frame"] == 0 and result["queries"] > 0
    assert sum(result["tokens"][c] for c in analysis.CLASSES) == result["tokens"]["total"] == 72
    for index, step in enumerate(result["steps"]):
        assert step["step"] == index and step["timestep"] == result["plan"]["timesteps"][index]
        assert sum(step["mass"].values()) == pytest.approx(1.0, abs=1e-5)
        maps = np.asarray(step["maps"])
        assert maps.shape == (3, 4, 6) and (maps >= 0).all()
        assert maps.sum() == pytest.approx(1.0, abs=1e-3)  # every frame is shown, so the whole distribution
        labels = np.asarray(result["labels"])
        by_class = [maps[labels == c].sum() for c in (tokens.GENERATIVE, tokens.MARGIN, tokens.CONTEXT)]
        assert by_class == pytest.approx(list(step["query_frame_mass"].values()), abs=1e-3)


def test_plan_signal_is_the_engines_plan_and_teacaches_rule(analysed):
    result, _, mask = analysed
    signal = result["plan"]
    config = analysis_config("hetcache-fast")
    pipe = load_pipeline("tiny-random", "cpu", "fp32", height=64, width=96)
    text_len = pipe.tokenizer.model_max_length  # the tiny tokenizer's 16 (the real encoder: 512)
    every_step = dataclasses.replace(config, step_fraction=1.0)  # the analysed run takes every step
    assert signal["hetcache"] == hetcache.plan_for(pipe, STEPS, every_step, mask=torch.from_numpy(mask),
                                                   text_len=text_len)
    assert [s["hetcache"] for s in result["steps"]] == list(signal["hetcache"])
    assert signal["distance"][0] is None and signal["accumulated"][0] is None
    delta = signal["delta"]
    assert delta is not None and signal["kappa"] == 1.5
    tea = signal["teacache"]
    assert set(tea) <= {"F", "R"} and tea[: config.warmup_steps] == "F" * config.warmup_steps and tea[-1] == "F"
    for index, letter in enumerate(tea[config.warmup_steps : -1], start=config.warmup_steps):
        assert (letter == "R") == (signal["teacache_accumulated"][index] < delta)
    assert signal["teacache_skips"] == [i for i, letter in enumerate(tea) if letter == "R"]


def test_the_probe_leaves_the_output_unchanged(tiny_pipe):
    video, mask = demo_clip(frames=5, height=32, width=32)
    plain = run_edit(tiny_pipe, video, mask, "a road", steps=2).frames
    partition = tokens.partition_from_pixel_mask(torch.from_numpy(mask), (2, 2, 2), margin=1)
    probe = attach_probe(tiny_pipe.transformer, partition, 0)
    try:
        probed = run_edit(tiny_pipe, video, mask, "a road", steps=2).frames
    finally:
        detach_probe(tiny_pipe.transformer)
    assert np.array_equal(plain, probed)
    assert len(probe.records) == 2
    assert np.array_equal(run_edit(tiny_pipe, video, mask, "a road", steps=2).frames, plain)  # hook removed


def test_bad_requests_are_user_errors(tmp_path):
    from hetcache.video import write_mask_video, write_video

    video, mask = demo_clip(frames=5, height=32, width=32)
    video_path = write_video(tmp_path / "clip.mp4", video, 8.0, lossless=True)
    empty = write_mask_video(tmp_path / "empty.mp4", np.zeros_like(mask), 8.0, lossless=True)
    common = ("a road", "tiny-random", 2, None, None, None, 0, 5.0, "cpu", "fp32", tmp_path / "out")
    with pytest.raises(UserError, match="mask is empty"):
        analyze_main(video_path, empty, None, *common)
    with pytest.raises(UserError, match="unknown preset"):
        analyze_main(video_path, None, "0,0,16,16", *common, preset="teacache")
    with pytest.raises(UserError, match="both decide"):
        analyze_main(video_path, None, "0,0,16,16", *common, delta=0.1, budget=0.5)
    with pytest.raises(UserError, match="kappa"):
        analysis_config(kappa=0.5)
    assert analysis_config(delta=0.2).budget is None and analysis_config(delta=0.2).delta == 0.2
