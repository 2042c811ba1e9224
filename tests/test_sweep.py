"""`hetcache sweep`: grid points, the default grids' FLOPs coverage, every file, one curve per method, resuming."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from tiny_models import demo_clip

from hetcache import sweep
from hetcache.bench import plan_row
from hetcache.config import PRESET_FAMILY, HetCacheConfig
from hetcache.errors import UserError
from hetcache.methods import method_flag
from hetcache.pipeline import build_tiny_random_pipeline, load_pipeline
from hetcache.sweep import (
    DEFAULT_GRIDS,
    DEFAULT_METHODS,
    Point,
    SweepClip,
    SweepSettings,
    grid_points,
    run_sweep,
)
from hetcache.video import write_mask_video, write_video

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ points
def test_default_points_cover_every_default_method_with_its_own_knob():
    points = grid_points()
    assert list(dict.fromkeys(p.method for p in points)) == list(DEFAULT_METHODS)
    assert [p.option_dict() for p in points if p.method == "teacache"] == list(DEFAULT_GRIDS["teacache"])
    assert {key for p in points if p.method == "fewer-steps" for key, _ in p.options} == {"steps_fraction"}
    assert {key for p in points if p.method == "hetcache" for key, _ in p.options} == {"budget", *PRESET_FAMILY}
    assert Point("teacache", (("delta", 0.05),)).label == "teacache delta=0.05"


def test_user_grids_replace_the_default_and_cross_their_fields():
    points = grid_points(["pab", "teacache", "full"],
                         {"pab": {"self_attention_range": [2, 4], "cross_attention_range": [6, 12]}},
                         {"teacache": {"warmup_steps": 1}})
    assert [p.label for p in points if p.method == "pab"] == [
        "pab cross_attention_range=6 self_attention_range=2", "pab cross_attention_range=12 self_attention_range=2",
        "pab cross_attention_range=6 self_attention_range=4", "pab cross_attention_range=12 self_attention_range=4"]
    teacache = [p.option_dict() for p in points if p.method == "teacache"]
    assert teacache == [{**options, "warmup_steps": 1} for options in DEFAULT_GRIDS["teacache"]]
    assert all(p.method != "full" for p in points)  # full is the reference, run once per clip


@pytest.mark.parametrize(
    ("methods", "grids", "options", "message"),
    [
        (["teacache"], {"pab": {"self_attention_range": [2]}}, {}, "--grid for pab, which is not among the swept"),
        (["teacache"], {}, {"pab": {"self_attention_range": 2}}, "--method-option for pab, which is not among"),
        (["teacache"], {"teacache": {"delta": [0.1]}}, {"teacache": {"delta": 0.2}}, "teacache.delta is set by"),
        (["tea"], {}, {}, "unknown method 'tea'"),
    ],
)
def test_grids_and_options_that_cannot_apply_are_refused(methods, grids, options, message):
    with pytest.raises(UserError, match=message):
        grid_points(methods, grids, options)


def test_unknown_grid_keys_are_refused_before_anything_runs(tmp_path):
    clip = SweepClip("c", *demo_clip(frames=5, height=32, width=32), "a road", "test")
    points = grid_points(["teacache"], {"teacache": {"dleta": [0.1]}})
    with pytest.raises(UserError, match="unknown option 'dleta' for teacache"):
        run_sweep(build_tiny_random_pipeline(), [clip], points, SweepSettings("tiny-random", 2), tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ coverage
@pytest.fixture(scope="module")
def proxy():
    return load_pipeline("proxy", "cpu", "fp32", height=256, width=256)


def test_default_grids_span_the_dense_flops_on_the_proxy(proxy):
    """Analytic shares of the default grids at the proxy's 20 steps, on a box covering a quarter of the frame:
    fewer-steps and TeaCache reach below 0.3 and above 0.6; HetCache (its budget buying solver steps too) below
    0.2 and above 0.6."""
    mask = torch.zeros(17, 256, 256, dtype=torch.bool)
    mask[:, 64:192, 64:192] = True
    text_len = min(512, int(proxy.tokenizer.model_max_length))
    shares = {}
    for point in grid_points(["fewer-steps", "teacache", "hetcache", "pab"]):
        config = sweep.point_config(point, SweepSettings("proxy", 20))
        row = plan_row(proxy, 20, point.method, config, mask=mask, text_len=text_len)
        shares.setdefault(point.method, []).append(row["flops_ratio"])
    for method in ("fewer-steps", "teacache"):
        assert min(shares[method]) < 0.3 and max(shares[method]) > 0.6, (method, shares[method])
    assert max(shares["hetcache"]) > 0.6 and min(shares["hetcache"]) < 0.2, shares["hetcache"]
    assert min(DEFAULT_GRIDS["hetcache"], key=lambda o: o["budget"])["budget"] < 0.3
    assert max(shares["pab"]) > 0.6 and min(shares["pab"]) < max(shares["pab"])


# ------------------------------------------------------------------------------------------------ running
def clips() -> list[SweepClip]:
    first, second = demo_clip(frames=9, height=32, width=64), demo_clip(frames=13, height=32, width=64)
    return [SweepClip("road", *first, "an empty road", "demo_clip"),
            SweepClip("road-later", second[0][4:], second[1][4:], "an empty road", "demo_clip")]


POINTS = grid_points(["fewer-steps", "teacache", "diffusers-fbc"],
                     {"fewer-steps": {"steps_fraction": [0.25, 0.5]}, "teacache": {"delta": [0.5, 1000.0]},
                      "diffusers-fbc": {"threshold": [0.5]}},
                     {"teacache": {"warmup_steps": 1}})


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    pipe = build_tiny_random_pipeline()
    lines = []
    results = run_sweep(pipe, clips(), POINTS, SweepSettings("tiny-random", 4), out, progress=lines.append,
                        show_bar=False)
    return pipe, out, results, lines


def test_every_file_is_written_with_one_row_per_point(swept):
    _, out, results, _ = swept
    for name in sweep.RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == results
    assert results["schema"] == "hetcache-sweep/1" and [c["id"] for c in results["clips"]] == ["road", "road-later"]
    labels = ["full"] + [p.label for p in POINTS]
    assert [row["label"] for row in results["points"]] == labels
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == labels and tuple(rows[0]) == sweep.CSV_COLUMNS
    report = (out / "results.md").read_text()
    assert "| `teacache` | delta=0.5 warmup_steps=1 | 2 |" in report and "Per clip: PSNR mask" in report
    assert len(results["runs"]) == 2 * len(labels)
    assert len(list((out / "runs").glob("*/*.json"))) == 2 * len(labels)


def test_points_are_means_over_clips_of_runs_against_each_clips_full(swept):
    _, _, results, _ = swept
    runs = results["runs"]
    for row in results["points"]:
        mine = [r for r in runs if r["label"] == row["label"]]
        assert row["clips"] == 2 and len(mine) == 2
        for column in ("flops_ratio", "psnr_mask_per_frame", "psnr_mask", "speedup"):
            values = [r[column] for r in mine if r[column] is not None]
            assert row[column] == (pytest.approx(sum(values) / len(values)) if values else None), column
    fewer = {r["options"]["steps_fraction"]: r for r in runs if r["method"] == "fewer-steps" and r["clip"] == "road"}
    assert fewer[0.25]["steps"] == 1 and fewer[0.25]["flops_ratio"] == pytest.approx(0.25)
    assert fewer[0.5]["flops_ratio"] == pytest.approx(0.5)
    teacache = {r["options"]["delta"]: r for r in runs if r["method"] == "teacache" and r["clip"] == "road"}
    # 2 of 4 steps computed; a REUSE step still runs the embeddings and the head (a large share of a tiny model)
    assert teacache[1000.0]["plan"] == "FRRF" and 0.5 < teacache[1000.0]["flops_ratio"] < 0.75
    full = [r for r in runs if r["method"] == "full"]
    assert all(r["identical"] and r["flops_ratio"] == 1.0 for r in full)


def test_the_plot_has_one_curve_per_method_and_flags_the_wrong_ones(swept):
    _, out, results, _ = swept
    labels = sweep.write_pareto(out / "again.png", results)
    assert labels == ["fewer-steps", "teacache", "diffusers-fbc [wrong on VACE]"]
    fbc = next(row for row in results["points"] if row["method"] == "diffusers-fbc")
    assert fbc["flag"] == method_flag("diffusers-fbc")
    assert all(run["flag"] == fbc["flag"] for run in results["runs"] if run["method"] == "diffusers-fbc")
    with open(out / "results.csv", newline="") as handle:
        flags = {row["method"]: row["flag"] for row in csv.DictReader(handle)}
    assert flags == {"full": "", "fewer-steps": "", "teacache": "", "diffusers-fbc": fbc["flag"]}
    assert "| wrong on VACE |" in (out / "results.md").read_text()


def test_a_second_sweep_reads_the_stored_runs_and_runs_only_new_points(swept, monkeypatch):
    pipe, out, results, _ = swept
    ran = []
    original = sweep.run_method
    monkeypatch.setattr(sweep, "run_method", lambda *a, **k: ran.append(a[1]) or original(*a, **k))
    again = run_sweep(pipe, clips(), POINTS, SweepSettings("tiny-random", 4), out, show_bar=False)
    assert ran == [] and again["points"] == results["points"]
    more = [*POINTS, Point("teacache", (("delta", 2.0), ("warmup_steps", 1)))]
    grown = run_sweep(pipe, clips(), more, SweepSettings("tiny-random", 4), out, show_bar=False)
    assert len(ran) == 2 and [type(c).__name__ for c in ran] == ["HetCacheConfig"] * 2  # the new point, 2 clips
    assert grown["points"][:-1] == results["points"]
    other = run_sweep(pipe, clips()[:1], POINTS[:1], SweepSettings("tiny-random", 4, seed=1), out, show_bar=False)
    assert len(ran) == 4 and other["points"][0]["clips"] == 1  # another seed: full and the point again


def test_fields_added_later_stay_out_of_the_key_at_their_default():
    """Runs stored before `max_step_fraction` existed keep matching configs that leave it at None; a set value is
    part of the key."""
    clip = clips()[0]
    settings = SweepSettings("tiny-random", 4)
    plain = sweep._key(settings, clip, "hetcache", HetCacheConfig(budget=0.3))
    capped = sweep._key(settings, clip, "hetcache", HetCacheConfig(budget=0.3, max_step_fraction=0.75))
    assert "max_step_fraction" not in plain["config"] and capped["config"]["max_step_fraction"] == 0.75
    assert sweep._digest(plain) != sweep._digest(capped)


def test_a_failing_run_is_listed_and_the_rest_go_on(tmp_path, monkeypatch):
    original = sweep.run_method

    def flaky(pipe, config, *args, **kwargs):
        if getattr(config, "steps_fraction", 1.0) == 0.25:
            raise RuntimeError("out of memory")
        return original(pipe, config, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_method", flaky)
    results = run_sweep(build_tiny_random_pipeline(), clips()[:1], POINTS[:2], SweepSettings("tiny-random", 4),
                        tmp_path, show_bar=False)
    assert results["failed"] == [{"clip": "road", "label": "fewer-steps steps_fraction=0.25",
                                  "reason": "failed: RuntimeError: out of memory"}]
    assert [row["label"] for row in results["points"]] == ["full", "fewer-steps steps_fraction=0.5"]
    assert "Failed runs" in (tmp_path / "results.md").read_text()


# ------------------------------------------------------------------------------------------------ inputs
def test_clips_come_from_a_video_or_a_dataset_folder(clip_files, tmp_path):
    video, mask = clip_files
    found, notes = sweep.load_clips(video, mask, None, "a road", "tiny-random", "folder", None, None, None)
    assert [c.id for c in found] == ["clip"] and found[0].video.shape == (9, 32, 64, 3) and notes == []
    with pytest.raises(UserError, match="--prompt is missing"):
        sweep.load_clips(video, mask, None, None, "tiny-random", "folder", None, None, None)
    with pytest.raises(UserError, match="give its --mask"):
        sweep.load_clips(video, None, None, "a road", "tiny-random", "folder", None, None, None)
    root = tmp_path / "set"
    for name, frames in (("a", 9), ("b", 13)):
        clip, clip_mask = demo_clip(frames=frames, height=32, width=64)
        write_video(root / name / "video.mp4", clip, 8.0, lossless=True)
        write_mask_video(root / name / "mask.mp4", clip_mask, 8.0, lossless=True)
    (root / "b" / "prompt.txt").write_text("a blue car\n")
    found, _ = sweep.load_clips(root, None, None, "an empty road", "tiny-random", "folder", None, None, None)
    assert [(c.id, c.prompt, len(c.video)) for c in found] == [("a", "an empty road", 9), ("b", "a blue car", 13)]
    found, notes = sweep.load_clips(root, None, None, None, "tiny-random", "folder", None, None, None)
    assert [c.id for c in found] == ["b"] and notes == ["a: left out: no prompt.txt (or it is empty)"]
    assert np.array_equal(found[0].mask, demo_clip(frames=13, height=32, width=64)[1])


def test_compile_compiles_full_and_every_point_the_same_way(tmp_path, monkeypatch):
    """torch.compile is replaced by a recorder that returns the function unchanged: this checks the wiring."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(getattr(fn, "__name__", fn)) or fn)
    pipe = build_tiny_random_pipeline()
    ran = []
    original = sweep.run_method
    monkeypatch.setattr(sweep, "run_method", lambda *a, **k: ran.append(k["untimed_first"]) or original(*a, **k))
    points = grid_points(["hetcache"], {"hetcache": {"budget": [0.5]}})
    results = run_sweep(pipe, clips()[:1], points, SweepSettings("tiny-random", 4, compile=True), tmp_path,
                        show_bar=False)
    assert compiled.count("forward") == len(pipe.transformer.blocks) + len(pipe.transformer.vace_blocks)
    assert ran == [True, True]  # full and the point, each with an untimed first run
    run = next(r for r in results["runs"] if r["method"] == "hetcache")
    assert results["settings"]["compile"] and "untimed" in results["settings"]["warmup"]
    stored = json.loads(next((tmp_path / "runs" / "road").glob("hetcache*.json")).read_text())
    assert stored["key"]["config"]["compile"] is True and run["label"] == "hetcache budget=0.5"
