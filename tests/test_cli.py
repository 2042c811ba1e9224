"""The `hetcache` command line end to end with the tiny model, and how bad input ends (exit 2, one line)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hetcache
from hetcache import cli, methods
from hetcache.bench import RESULT_FILES
from hetcache.methods import METHOD_NAMES
from hetcache.cli import app
from hetcache.video import prepare_inputs, read_frames, write_video

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--model", "tiny-random", "--steps", "2", "--device", "cpu"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.skipif(not (SHARED_DATA / "driving.mp4").exists(), reason="needs the shared driving clip")
def test_edit_driving_clip_writes_9_frames_of_224x128(tmp_path):
    out = tmp_path / "out.mp4"
    result = invoke(
        "edit", SHARED_DATA / "driving.mp4", "--mask", SHARED_DATA / "driving_mask.mp4", "--prompt", "an empty road",
        "--frames", "9", "--height", "128", "--width", "224", "-o", out, *TINY,
    )
    assert result.exit_code == 0, result.output
    assert read_frames(out).frames.shape == (9, 128, 224, 3)
    assert read_frames(tmp_path / "out_side_by_side.mp4").frames.shape == (9, 128, 3 * 224, 3)
    assert "224x128 x 9 frames" in result.stdout
    assert "note: the mask is 832x480 but the video 854x480" in result.stderr
    assert "denoising" in result.stderr


def test_edit_composites_into_the_original_outside_the_mask(clip_files, tmp_path):
    video, mask = clip_files
    out = tmp_path / "out.mp4"
    result = invoke("edit", video, "--mask", mask, "-p", "an empty road", "-o", out, "--lossless", *TINY)
    assert result.exit_code == 0, result.output
    prepared = prepare_inputs(video, mask)
    written = read_frames(out).frames
    assert written.shape == prepared.video.shape
    np.testing.assert_array_equal(written[~prepared.mask], prepared.video[~prepared.mask])
    assert not np.array_equal(written[prepared.mask], prepared.video[prepared.mask])
    assert "method   full: no cache" in result.stdout


def test_no_composite_keeps_the_raw_output(clip_files, tmp_path):
    video, mask = clip_files
    out = tmp_path / "raw.mp4"
    result = invoke(
        "edit", video, "--mask", mask, "-p", "a road", "-o", out, "--lossless", "--no-composite", "--no-side-by-side",
        *TINY,
    )
    assert result.exit_code == 0, result.output
    prepared = prepare_inputs(video, mask)
    assert not np.array_equal(read_frames(out).frames[~prepared.mask], prepared.video[~prepared.mask])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "mask.mp4", "raw.mp4"]


def test_box_mask_and_side_by_side_path(clip_files, tmp_path):
    video, _ = clip_files
    side = tmp_path / "panel.mp4"
    result = invoke(
        "edit", video, "--box", "8,4,40,28", "-p", "a road", "-o", tmp_path / "o.mp4", "--side-by-side", side, *TINY
    )
    assert result.exit_code == 0, result.output
    assert read_frames(side).frames.shape == (9, 32, 3 * 64, 3)


def test_demo_writes_its_four_videos(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo", "--steps", "2", "--device", "cpu", "--model", "tiny-random")
    assert result.exit_code == 0, result.output
    for name in ("input.mp4", "mask.mp4", "output.mp4"):
        assert read_frames(tmp_path / "demo" / name).frames.shape == (17, 256, 256, 3)
    assert read_frames(tmp_path / "demo" / "side_by_side.mp4").frames.shape == (17, 256, 3 * 256, 3)
    assert "tiny-random, 2 steps, guidance 5" in result.stdout
    # On 2 steps the fast preset's budget (0.33) is met by one solver step of the two asked for
    assert re.search(r"^method   hetcache-fast: plan F \(1 of 2 steps\), 0.50 of the dense FLOPs", result.stdout,
                     re.MULTILINE), result.stdout


def test_edit_with_hetcache_fast_runs_the_plan_that_plan_for_predicts(clip_files, tiny_pipe, tmp_path):
    video, mask = clip_files
    steps = 12  # enough for the fast preset's budget to be met with REUSE steps rather than fewer solver steps
    result = invoke("edit", video, "--mask", mask, "-p", "a road", "-o", tmp_path / "o.mp4", "--method",
                    "hetcache-fast", "--model", "tiny-random", "--steps", steps, "--device", "cpu")
    assert result.exit_code == 0, result.output
    pixel_mask = torch.from_numpy(prepare_inputs(video, mask).mask)
    expected = hetcache.plan_for(tiny_pipe, steps, hetcache.HetCacheConfig.fast(), mask=pixel_mask, text_len=16)
    counted = f"{steps} steps" if len(expected) == steps else f"{len(expected)} of {steps} steps"
    line = next(line for line in result.stdout.splitlines() if line.startswith("method "))
    assert re.fullmatch(rf"method   hetcache-fast: plan {expected} \({counted}\), 0\.\d\d of the dense FLOPs "
                        r"\(analytic\)", line), line
    assert "P" in expected or len(expected) < steps  # it saved compute, so the FLOPs ratio above is below 1
    assert "denoising" in result.stderr


def test_edit_fewer_steps_runs_half_the_steps_at_half_the_flops(clip_files, tmp_path):
    video, mask = clip_files
    result = invoke("edit", video, "--mask", mask, "-p", "a road", "-o", tmp_path / "o.mp4", "--method",
                    "fewer-steps", "--model", "tiny-random", "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "tiny-random, 2 steps" in result.stdout
    assert "method   fewer-steps: plan FF (2 of 4 steps), 0.50 of the dense FLOPs (analytic)" in result.stdout


def test_method_names_agree_with_hetcache_methods():
    assert cli.METHOD_NAMES == METHOD_NAMES
    assert cli.BENCH_METHODS.split(",") == list(methods.OWN_METHODS)


def test_bench_writes_every_file_with_one_row_and_one_progress_line_per_method(clip_files, tmp_path):
    video, mask = clip_files
    out = tmp_path / "bench"
    result = invoke("bench", video, "--mask", mask, "-p", "a road", "--methods", "pab,hetcache-fast,full",
                    "--out", out, *TINY[:2], "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    names = ["full", "pab", "hetcache-fast"]
    assert sorted(path.name for path in out.iterdir()) == sorted(RESULT_FILES)
    assert [m["name"] for m in json.loads((out / "results.json").read_text())["methods"]] == names
    with (out / "results.csv").open() as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == names
    progress = [line.split()[0] for line in result.stderr.splitlines()
                if not line.startswith(("note:", "warning:"))]  # timing warnings come when the machine is loaded
    assert progress == names
    assert all(f"| `{name}` |" in result.stdout for name in names)
    assert read_frames(out / "side_by_side.mp4").frames.shape == (9, 2 * 32, 2 * 64, 3)


def test_plan_prints_each_methods_letters_without_running_the_denoiser(tiny_pipe, monkeypatch):
    def no_denoiser(*args, **kwargs):
        raise AssertionError("plan ran the transformer")

    monkeypatch.setattr(type(tiny_pipe.transformer), "forward", no_denoiser)
    steps, frames, height, width = 12, 9, 32, 64
    result = invoke("plan", "--model", "tiny-random", "--steps", steps, "--methods", "hetcache-slow,hetcache-fast,pab",
                    "--frames", frames, "--height", height, "--width", width)
    assert result.exit_code == 0, result.output
    box = torch.zeros(frames, height, width, dtype=torch.bool)
    box[:, height // 4 : height - height // 4, width // 4 : width - width // 4] = True  # plan's default mask
    lines = result.stdout.splitlines()
    legend = lines.index("FLOPs as a fraction of full (analytic); F computed, P partly reused, R reused")
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:legend]}
    assert list(rows) == ["full", "hetcache-slow", "hetcache-fast", "pab"]
    assert [line.split()[1] for line in lines[legend + 1:]] == ["hetcache-slow:", "hetcache-fast:"]  # memory
    assert rows["full"] == ["1.000", "F" * steps]
    for name, config in (("hetcache-slow", hetcache.HetCacheConfig.slow()),
                         ("hetcache-fast", hetcache.HetCacheConfig.fast())):
        letters = hetcache.plan_for(tiny_pipe, steps, config, mask=box, text_len=16)
        assert rows[name][1] == letters and 0 < float(rows[name][0]) < 1
    assert re.fullmatch(rf"[FP]{{{steps}}}", rows["pab"][1])


GOOD = ["{video}", "--mask", "{mask}", "-p", "a road", "-o", "{tmp}/out.mp4", *TINY]
WITHOUT_MASK = ["-p", "a road", "-o", "{tmp}/out.mp4", *TINY]
BAD_INPUTS = {
    "missing video": (["{tmp}/nope.mp4", "--mask", "{mask}", *WITHOUT_MASK], "not found"),
    "corrupt video": (["{tmp}/corrupt.mp4", "--mask", "{mask}", *WITHOUT_MASK], "cannot read video"),
    "zero frames": (["{tmp}/empty", "--mask", "{mask}", *WITHOUT_MASK], "holds no images"),
    "unreadable mask": (["{video}", "--mask", "{tmp}/corrupt.mp4", *WITHOUT_MASK], "cannot read mask"),
    "no mask": (["{video}", *WITHOUT_MASK], "exactly one mask"),
    "mask and box": ([*GOOD, "--box", "0,0,8,8"], "exactly one mask"),
    "bad box": (["{video}", "--box", "0,0,8", *WITHOUT_MASK], "four integers"),
    "unknown model": ([*GOOD, "--model", "no-such-model"], "unknown model"),
    "empty prompt": ([*GOOD, "-p", ""], "prompt is empty"),
    "blank prompt": ([*GOOD, "-p", "  "], "prompt is empty"),
    "height not x16": ([*GOOD, "--height", "40"], "multiple of 16"),
    "frames not 4k+1": ([*GOOD, "--frames", "8"], "4k+1"),
    "too many frames": ([*GOOD, "--frames", "13"], "the video has 9"),
    "bad device": ([*GOOD, "--device", "gpu0"], "unknown device"),
    "bad dtype": ([*GOOD, "--dtype", "int8"], "unknown dtype"),
    "side-by-side twice": ([*GOOD, "--side-by-side", "{tmp}/s.mp4", "--no-side-by-side"], "conflict"),
    "output is a folder": ([*GOOD, "-o", "{tmp}/empty"], "is a folder"),
    "unknown method": ([*GOOD, "--method", "nope"], "unknown method 'nope': use one of " + ", ".join(METHOD_NAMES)),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, clip_files, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "empty").mkdir()
    template, expected = BAD_INPUTS[case]
    paths = {"video": clip_files[0], "mask": clip_files[1], "tmp": tmp_path}
    assert_user_error(invoke("edit", *(arg.format(**paths) for arg in template)), expected)
    assert not (tmp_path / "out.mp4").exists()


USAGE_ERRORS = [
    (["edit"], "error: Missing argument 'video': see "),
    (["edit", "v.mp4", "-o", "o.mp4"], "error: Missing option '--prompt' / '-p': see "),
    (["edit", "v.mp4", "-p", "x", "-o", "o.mp4", "--steps", "0"], "Invalid value for '--steps'"),
    (["edit", "v.mp4", "-p", "x", "-o", "o.mp4", "--seed", "abc"], "Invalid value for '--seed'"),
    (["edit", "v.mp4", "-p", "x", "-o", "o.mp4", "--seed", str(2**64)], "less than or equal to 18446744073709551615"),
    (["bench", "v.mp4", "-p", "x", "--out", "o", "--seed", "-1"], "Invalid value for '--seed'"),
    (["edit", "v.mp4", "--bogus"], "No such option: --bogus"),
    (["nope"], "error: No such command 'nope': see "),
]


@pytest.mark.parametrize(("args", "expected"), USAGE_ERRORS)
def test_usage_errors_exit_2_with_one_line(args, expected):
    result = runner.invoke(app, args)
    assert_user_error(result, expected)
    assert result.stderr.rstrip().endswith("--help")


def test_hetcache_alone_prints_the_help():
    result = runner.invoke(app, [])
    assert result.exit_code == 0 and "Usage: " in result.stdout and "edit" in result.stdout


def test_demo_out_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(invoke("demo", "--out", tmp_path / "file"), "is a file")


def test_demo_unknown_method_is_a_user_error_before_writing(tmp_path):
    assert_user_error(invoke("demo", "--out", tmp_path / "demo", "--method", "nope"), "unknown method 'nope'")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--methods", "full,nope"], "unknown method 'nope'"),
        (["-p", " "], "prompt is empty"),
        (["--out", "{tmp}/file"], "is a file"),
    ],
)
def test_bench_bad_input_exits_2_with_one_line(args, expected, clip_files, tmp_path):
    (tmp_path / "file").write_text("x")
    video, mask = clip_files
    base = ["bench", video, "--mask", mask, "-p", "a road", "--out", tmp_path / "bench", *TINY]
    assert_user_error(invoke(*base, *(str(a).format(tmp=tmp_path) for a in args)), expected)
    assert not (tmp_path / "bench").exists()


def test_plan_with_delta_and_budget_is_a_user_error():
    assert_user_error(invoke("plan", "--model", "tiny-random", "--delta", "0.1", "--budget", "0.5"), "give one of them")


def test_help_and_input_errors_do_not_load_torch(tmp_path):
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from hetcache.cli import app\n"
        "runner = CliRunner()\n"
        "assert runner.invoke(app, ['--help']).exit_code == 0\n"
        f"for args in (['edit', {str(tmp_path / 'missing.mp4')!r}, '--box', '0,0,8,8', '-p', 'a', '-o', 'o.mp4'],\n"
        "             ['bench', 'v.mp4', '--box', '0,0,8,8', '-p', ' ', '--out', 'b'],\n"
        "             ['edit', 'v.mp4', '--box', '0,0,8,8', '-p', 'a', '-o', 'o.mp4', '--method', 'nope']):\n"
        "    assert runner.invoke(app, args).exit_code == 2, args\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    script = Path(sys.executable).with_name("hetcache")
    done = subprocess.run(
        [script, "edit", tmp_path / "missing.mp4", "--box", "0,0,8,8", "-p", "a road", "-o", tmp_path / "o.mp4"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: video not found"), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_analyze_writes_its_json_and_figures(clip_files, tmp_path):
    video, mask = clip_files
    out = tmp_path / "analysis"
    result = invoke("analyze", video, "--mask", mask, "-p", "an empty road", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "analysis.png", "mass_by_class.png"]
    assert len(json.loads((out / "analysis.json").read_text())["steps"]) == 2


def test_eval_of_a_missing_dataset_exits_2_with_one_line(tmp_path):
    result = invoke("eval", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "out", "--model", "tiny-random")
    assert_user_error(result, "nowhere")


def test_edit_with_the_proxy_uses_its_defaults(tmp_path):
    """The proxy caps the size at 256x256 pixels and 17 frames and turns guidance off unless told otherwise."""
    frames = np.random.default_rng(0).integers(0, 256, (21, 240, 320, 3), dtype=np.uint8)
    video = write_video(tmp_path / "wide.mp4", frames, 8.0, lossless=True)
    result = invoke("edit", video, "--box", "100,20,200,70", "-p", "remove it", "-o", tmp_path / "o.mp4",
                    "--model", "proxy", "--steps", "1", "--device", "cpu", "--no-side-by-side")
    assert result.exit_code == 0, result.output
    assert read_frames(tmp_path / "o.mp4").frames.shape == (17, 224, 288, 3)  # 64,512 of at most 65,536 pixels
    assert "proxy, 1 steps, guidance 1, seed 0" in result.stdout


def test_eval_runs_a_folder_dataset_with_the_default_guidance(clip_files, tmp_path):
    video, mask = clip_files
    item = tmp_path / "data" / "clip0"
    item.mkdir(parents=True)
    for name, path in (("video.mp4", video), ("mask.mp4", mask)):
        (item / name).write_bytes(path.read_bytes())
    (item / "prompt.txt").write_text("an empty road\n")
    result = invoke("eval", "--dataset", tmp_path / "data", "--out", tmp_path / "out", "--methods", "full",
                    *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "aggregate.json").read_text())["settings"]["guidance"] == 5.0


def test_method_options_set_a_methods_config(clip_files, tmp_path):
    video, mask = clip_files
    result = invoke("edit", video, "--mask", mask, "-p", "a road", "-o", tmp_path / "o.mp4", "--method", "teacache",
                    "--method-option", "teacache.delta=1000", "--method-option", "teacache.warmup_steps=1", *TINY[:2],
                    "--steps", "4", "--device", "cpu", "--no-side-by-side")
    assert result.exit_code == 0, result.output
    assert "method   teacache: plan FRRF (4 steps)" in result.stdout


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("teacache.dleta=0.1", "unknown option 'dleta' for teacache: use one of delta, kappa"),
        ("tea.delta=0.1", "unknown method 'tea'"),
        ("teacache.delta", "is not NAME.KEY=VALUE"),
        ("pab.self_attention_range=2", "--method-option for pab, which is not among the methods run"),
        ("teacache.delta=-1", "options {'delta': -1} for teacache: delta must be >= 0"),
        ("teacache.delta=0.1,", "an option value is empty"),
    ],
)
def test_bad_method_options_exit_2_with_one_line(option, expected, clip_files, tmp_path):
    video, mask = clip_files
    for command in (["edit", video, "--mask", mask, "-p", "a road", "-o", tmp_path / "o.mp4", "--method", "teacache"],
                    ["bench", video, "--mask", mask, "-p", "a road", "--out", tmp_path / "b", "--methods", "teacache"],
                    ["eval", "--dataset", tmp_path, "--out", tmp_path / "e", "--methods", "teacache"]):
        assert_user_error(invoke(*command, "--method-option", option, *TINY), expected)
    assert not (tmp_path / "b").exists() and not (tmp_path / "o.mp4").exists()


def test_sweep_writes_every_file_and_prints_the_report(clip_files, tmp_path):
    from hetcache import sweep

    assert cli.SWEEP_METHODS.split(",") == list(sweep.DEFAULT_METHODS)
    video, mask = clip_files
    out = tmp_path / "sweep"
    result = invoke("sweep", video, "--mask", mask, "-p", "a road", "--out", out, "--methods", "fewer-steps,teacache",
                    "--grid", "fewer-steps.steps_fraction=0.5", "--grid", "teacache.delta=0.5,1000",
                    "--method-option", "teacache.warmup_steps=1", *TINY[:2], "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {*sweep.RESULT_FILES, "runs"}
    labels = [row["label"] for row in json.loads((out / "results.json").read_text())["points"]]
    assert labels == ["full", "fewer-steps steps_fraction=0.5", "teacache delta=0.5 warmup_steps=1",
                      "teacache delta=1000 warmup_steps=1"]
    assert result.stdout.startswith("# hetcache sweep") and "sweep: 100%" in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--grid", "teacache.dleta=1"], "unknown option 'dleta' for teacache"),
        (["--grid", "nope.delta=1"], "unknown method 'nope'"),
        (["--grid", "pab.self_attention_range=2"], "--grid for pab, which is not among the swept methods"),
        (["--methods", "teacache,nope"], "unknown method 'nope'"),
        (["--mask", "{tmp}/missing.mp4"], "not found"),
    ],
)
def test_sweep_bad_input_exits_2_with_one_line(args, expected, clip_files, tmp_path):
    video, mask = clip_files
    args = [str(a).format(tmp=tmp_path) for a in args]
    base = ["sweep", video, "-p", "a road", "--out", tmp_path / "s", "--methods", "teacache", *TINY]
    if "--mask" not in args:
        base[2:2] = ["--mask", mask]
    assert_user_error(invoke(*base, *args), expected)
    assert not (tmp_path / "s").exists()
