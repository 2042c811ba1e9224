"""Every command on the tiny two-expert pipeline (`tiny-random-moe`, as Wan2.2's VACE-Fun A14B) with
`--guidance-2`, and the cache flags (`--cache-device`, `--cache-dtype`) with the fit check before denoising."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hetcache
from hetcache import cli, memory
from hetcache.cli import app
from hetcache.config import CACHE_DEVICES, HetCacheConfig
from hetcache.pipeline import build_tiny_random_pipeline, run_edit
from hetcache.video import prepare_inputs, read_frames

MOE = ["--model", "tiny-random-moe", "--device", "cpu"]
STEPS = 6  # the tiny experts switch at t = 875: steps 0-1 on the first, 2-5 on the second

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def moe():
    return build_tiny_random_pipeline(two_experts=True)


def test_the_tiny_experts_switch_where_the_tests_expect(moe):
    assert hetcache.expert_switch(moe, STEPS) == 2


# ------------------------------------------------------------------------------------------------ --guidance-2
def test_guidance_2_reaches_the_second_expert_only(moe, clip_files):
    inputs = prepare_inputs(*clip_files)

    def frames(**kwargs):
        return run_edit(moe, inputs.video, inputs.mask, "a road", steps=STEPS, **kwargs).frames

    plain = frames(guidance=5.0)
    np.testing.assert_array_equal(frames(guidance=5.0, guidance_2=5.0), plain)  # the pipeline's own default
    assert not np.array_equal(frames(guidance=5.0, guidance_2=2.0), plain)
    calls = []
    handles = [expert.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
               for i, expert in enumerate((moe.transformer, moe.transformer_2))]
    try:
        frames(guidance=5.0, guidance_2=2.0)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0] * 4 + [1] * 8  # 2 steps x 2 CFG branches on the first expert, 4 x 2 on the second


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_guidance_2_is_refused(value, clip_files, tmp_path):
    result = invoke("edit", *clip_files[:1], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mp4",
                    "--guidance-2", value, *MOE)
    assert_user_error(result, f"--guidance-2 {value} is not a finite number")


# ------------------------------------------------------------------------------------------------ every command
def test_edit_runs_two_experts_and_says_where_they_switch(clip_files, tmp_path, moe):
    result = invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "a road", "-o", tmp_path / "o.mp4",
                    "--steps", STEPS, "--method", "hetcache", "--method-option", "hetcache.plan=FFFRPF",
                    "--guidance-2", "2", *MOE)
    assert result.exit_code == 0, result.output
    assert f"model    tiny-random-moe, {STEPS} steps, guidance 5 (second expert 2), seed 0" in result.stdout
    assert f"experts  transformer for steps 0-1, transformer_2 from step 2 of {STEPS}" in result.stdout
    assert "method   hetcache: plan FFFRPF (6 steps)" in result.stdout
    assert re.search(r"^memory   cache \d+\.\d\d GiB .* on cpu$", result.stdout, re.M)
    assert read_frames(tmp_path / "o.mp4").frames.shape == (9, 32, 64, 3)


def test_bench_runs_two_experts(clip_files, tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, "--steps", STEPS,
                    "--methods", "full,hetcache-slow,pab", "--guidance-2", "2", *MOE)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert (settings["experts"], settings["guidance_2"]) == (2, 2.0)
    assert [m["name"] for m in results["methods"]] == ["full", "hetcache-slow", "pab"]
    hetcache_row = results["methods"][1]
    assert hetcache_row["plan"][hetcache.expert_switch(build_tiny_random_pipeline(two_experts=True),
                                                       len(hetcache_row["plan"]))] == "F"
    assert set(settings["cache_estimates"]) == {"hetcache-slow"}
    assert "guidance 5 (second expert 2), two experts" in result.stdout
    assert "Cache estimate (`hetcache.memory`, checked before denoising): `hetcache-slow` cache" in result.stdout


def test_sweep_runs_two_experts(clip_files, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, "--steps", 4,
                    "--methods", "fewer-steps,hetcache", "--grid", "fewer-steps.steps_fraction=0.5",
                    "--grid", "hetcache.budget=0.6", "--guidance-2", "2", *MOE)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["guidance_2"] == 2.0
    assert [p["label"] for p in results["points"]] == ["full", "fewer-steps steps_fraction=0.5", "hetcache budget=0.6"]
    assert all(p["complete"] for p in results["points"])


def test_eval_runs_two_experts(clip_files, tmp_path):
    item = tmp_path / "data" / "c0"
    item.mkdir(parents=True)
    shutil.copyfile(clip_files[0], item / "video.mp4")
    shutil.copyfile(clip_files[1], item / "mask.mp4")
    (item / "prompt.txt").write_text("a road\n")
    out = tmp_path / "eval"
    result = invoke("eval", "--dataset", tmp_path / "data", "--out", out, "--steps", 4, "--methods",
                    "full,hetcache-fast", "--guidance-2", "2", *MOE)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "aggregate.json").read_text())
    assert summary["settings"]["guidance_2"] == 2.0 and summary["failed"] == []
    assert [r["method"] for r in summary["rows"]] == ["full", "hetcache-fast"]


def test_analyze_probes_both_experts(clip_files, tmp_path, moe):
    out = tmp_path / "analysis"
    result = invoke("analyze", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, "--steps",
                    STEPS, "--guidance-2", "2", *MOE)
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["experts"] == 2 and analysis["plan"]["switch"] == 2
    assert [step["expert"] for step in analysis["steps"]] == [0, 0, 1, 1, 1, 1]
    assert analysis["plan"]["hetcache"][2] == "F" and analysis["settings"]["guidance_2"] == 2.0


def test_guidance_2_on_one_expert_is_one_line(clip_files, tmp_path):
    for args in (["edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mp4"],
                 ["bench", clip_files[0], "--mask", clip_files[1], "-p", "x", "--out", tmp_path / "b",
                  "--methods", "full"]):
        result = invoke(*args, "--guidance-2", "2", "--model", "tiny-random", "--steps", 1, "--device", "cpu")
        assert_user_error(result, "--guidance-2 is the second expert's guidance of a two-expert pipeline")
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------------------------------------------------------------ cache flags
def test_the_cli_lists_agree_with_the_config():
    assert cli.CACHE_DEVICES == CACHE_DEVICES
    for name in cli.CACHE_DTYPES:
        assert HetCacheConfig(cache_dtype=name).cache_dtype == getattr(torch, name)


def test_cache_flags_set_every_hetcache_methods_config_and_a_method_option_wins(clip_files, tmp_path):
    out = tmp_path / "bench"
    result = invoke("bench", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, "--steps", 4,
                    "--methods", "full,hetcache-slow,hetcache-fast,pab", "--cache-device", "cpu", "--cache-dtype",
                    "float8_e4m3fn", "--method-option", "hetcache-fast.cache_dtype=bfloat16",
                    "--model", "tiny-random", "--device", "cpu")
    assert result.exit_code == 0, result.output
    configs = {m["name"]: m["config"] for m in json.loads((out / "results.json").read_text())["methods"]}
    assert (configs["hetcache-slow"]["cache_dtype"], configs["hetcache-slow"]["cache_device"]) == \
        ("float8_e4m3fn", "cpu")
    assert (configs["hetcache-fast"]["cache_dtype"], configs["hetcache-fast"]["cache_device"]) == ("bfloat16", "cpu")
    assert "cache_dtype" not in configs["pab"]


def test_edit_shows_the_estimate_of_the_cache_it_runs(clip_files, tmp_path):
    result = invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "a road", "-o", tmp_path / "o.mp4",
                    "--method", "hetcache-slow", "--cache-dtype", "float8_e4m3fn", "--steps", 4, "--model",
                    "tiny-random", "--device", "cpu")
    assert result.exit_code == 0, result.output
    transformer = build_tiny_random_pipeline().transformer
    estimate = memory.estimate_memory(transformer, 9, 32, 64, HetCacheConfig.slow(cache_dtype=torch.float8_e4m3fn),
                                      dtype=torch.float32, text_len=16)
    assert f"memory   {estimate.describe()} on cpu" in result.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--cache-dtype", "int8"], "unknown --cache-dtype 'int8': use one of bfloat16"),
    (["--cache-device", "gpu"], "unknown --cache-device 'gpu': use one of auto, cuda, cpu"),
    (["--cache-dtype", "bfloat16", "--method", "pab"], "--cache-dtype set HetCache's cache, and no HetCache method "
                                                        "runs (pab)"),
])
def test_bad_cache_flags_are_one_line(args, expected, clip_files, tmp_path):
    result = invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mp4", *args,
                    "--model", "tiny-random", "--steps", 1, "--device", "cpu")
    assert_user_error(result, expected)
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("command", ["edit", "bench", "sweep"])
def test_a_cache_that_fits_nowhere_stops_before_denoising(command, clip_files, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 0)  # on the CPU the device is the host
    video, mask = clip_files
    common = [video, "--mask", mask, "-p", "a road", "--steps", 2, "--model", "tiny-random", "--device", "cpu"]
    args = {"edit": ["edit", *common, "-o", tmp_path / "o.mp4", "--method", "hetcache-fast"],
            "bench": ["bench", *common, "--out", tmp_path / "out", "--methods", "full,hetcache-fast"],
            "sweep": ["sweep", *common, "--out", tmp_path / "out", "--methods", "hetcache"]}[command]
    result = invoke(*args)
    assert_user_error(result, "the cache does not fit: cache ")
    assert "try --cache-dtype float8_e4m3fn, fewer --frames, a smaller --height/--width" in result.stderr
    assert "denoising" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "mask.mp4"]


def test_eval_fails_an_item_whose_cache_fits_nowhere(clip_files, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 0)
    item = tmp_path / "data" / "c0"
    item.mkdir(parents=True)
    for name, path in (("video.mp4", clip_files[0]), ("mask.mp4", clip_files[1])):
        shutil.copyfile(path, item / name)
    (item / "prompt.txt").write_text("a road\n")
    result = invoke("eval", "--dataset", tmp_path / "data", "--out", tmp_path / "out", "--methods",
                    "full,hetcache-fast", "--steps", 2, "--model", "tiny-random", "--device", "cpu")
    assert result.exit_code == 0, result.output
    failed = json.loads((tmp_path / "out" / "aggregate.json").read_text())["failed"]
    assert [f["item"] for f in failed] == ["c0"] and failed[0]["reason"].startswith("the cache does not fit")
