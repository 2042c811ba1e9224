"""`hetcache calibrate`: the search space, the front, the choice for a target, config files, resuming (CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import demo_clip

from hetcache.calibrate import (
    METHOD,
    Target,
    calibrate,
    choose,
    load_config,
    pareto_front,
    search_points,
)
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.pipeline import build_tiny_random_pipeline
from hetcache.sweep import Point, SweepClip, SweepSettings


def row(label, flops, psnr, speedup=None, complete=True, options=None):
    return {"label": label, "flops_ratio": flops, "psnr_mask_per_frame": psnr, "speedup": speedup,
            "complete": complete, "options": options or {}, "steps": 10.0, "clips": 2}


ROWS = [row("a", 0.2, 30.0, 4.0), row("b", 0.25, 29.0, 3.5), row("c", 0.3, 36.0, 3.0), row("d", 0.5, 41.0, 1.9),
        row("e", 0.45, 42.0, 2.1), row("f", 0.1, 50.0, complete=False)]


def test_targets_parse_and_refuse_nonsense():
    assert Target.parse("flops=0.3") == Target("flops", 0.3)
    assert Target.parse(" PSNR = 38") == Target("psnr", 38.0)
    for bad in ("flops=1.5", "speed=3", "psnr=x", "flops=-1", "speedup=inf"):
        with pytest.raises(UserError):
            Target.parse(bad)


def test_front_keeps_the_undominated_complete_rows():
    assert [r["label"] for r in pareto_front(ROWS)] == ["a", "c", "e"]  # b and d dominated, f incomplete


def test_choice_for_each_kind_of_target():
    assert choose(ROWS, Target("flops", 0.32))["label"] == "c"
    assert choose(ROWS, Target("flops", 1.0))["label"] == "e"
    assert choose(ROWS, Target("speedup", 2.5))["label"] == "c"
    assert choose(ROWS, Target("psnr", 35.0))["label"] == "c"
    with pytest.raises(UserError, match="closest is 'a'"):
        choose(ROWS, Target("flops", 0.1))
    with pytest.raises(UserError, match="closest is 'e'"):
        choose(ROWS, Target("psnr", 45.0))


def test_search_space_holds_fewer_steps_both_families_and_forecasts():
    points = search_points("standard")
    options = [p.option_dict() for p in points]
    assert all(p.method == METHOD for p in points) and len(set(points)) == len(points)
    fewer = [o for o in options if o.get("delta") == 0.0]
    assert sorted(o["step_fraction"] for o in fewer) == [0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7]
    assert {o.get("max_reuse") for o in options if "budget" in o and o["budget"]} == {0, 3}
    assert {o.get("reuse") for o in options} >= {"hold", "linear"}
    assert any(o.get("margin_ratio") == 0.35 for o in options)
    assert {o.get("max_step_fraction") for o in options if o.get("max_reuse") == 0} == {0.5, 0.75, None}
    assert "quadratic" in {o.get("reuse") for o in (p.option_dict() for p in search_points("wide"))}
    for point in points:  # every one is a valid config
        HetCacheConfig(**{k: v for k, v in point.option_dict().items()})
    with pytest.raises(UserError, match="unknown search"):
        search_points("huge")


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_tiny_random_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_calibrate_writes_the_front_and_a_loadable_choice_and_resumes(pipe, tmp_path, monkeypatch):
    video, mask = demo_clip(frames=9, height=32, width=64)
    clips = [SweepClip("demo", video, mask, "an empty road", "demo_clip")]
    settings = SweepSettings(model="tiny-random", steps=8)
    points = [Point(METHOD, tuple(sorted(o.items()))) for o in (
        {"delta": 0.0, "budget": None, "step_fraction": 0.25}, {"delta": 0.0, "budget": None, "step_fraction": 0.5},
        {"budget": 0.3, "max_reuse": 0, "margin": 1}, {"budget": 0.3, "max_reuse": 3, "reuse": "linear", "margin": 1})]
    chosen = calibrate(pipe, clips, settings, tmp_path, Target("flops", 0.5), points=points, show_bar=False)
    for name in ("front.json", "front.csv", "front.md", "front.png", "chosen.json"):
        assert (tmp_path / name).is_file()
    report = json.loads((tmp_path / "front.json").read_text())
    assert len(report["all"]) == 4 and report["front"] and chosen["measured"]["flops_ratio"] <= 0.5 + 1e-9
    config = load_config(tmp_path / "chosen.json")
    assert config.to_dict() == chosen["config"]
    # Resuming: a second calibration reads every stored run and runs nothing.
    monkeypatch.setattr("hetcache.sweep.run_method", lambda *a, **k: pytest.fail("a stored run ran again"))
    assert calibrate(pipe, clips, settings, tmp_path, Target("flops", 0.5), points=points, show_bar=False) == chosen


def test_config_files_that_are_not_configs_are_refused(tmp_path):
    path = tmp_path / "c.json"
    with pytest.raises(UserError, match="does not exist"):
        load_config(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a HetCache config"):
        load_config(path)
    path.write_text(json.dumps({"budget": 0.3, "cache_dtype": "float8_e4m3fn"}))
    assert load_config(path).cache_dtype == torch.float8_e4m3fn


def test_cli_calibrates_a_clip_and_refuses_bad_targets(tmp_path):
    from typer.testing import CliRunner

    from hetcache.cli import app
    from hetcache.video import write_mask_video, write_video

    video, mask = demo_clip(frames=9, height=32, width=64)
    write_video(tmp_path / "clip.mp4", video, 8.0, lossless=True)
    write_mask_video(tmp_path / "mask.mp4", mask, 8.0, lossless=True)
    runner = CliRunner()
    bad = runner.invoke(app, ["calibrate", str(tmp_path / "clip.mp4"), "--target", "fast", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "target 'fast'" in bad.output and not (tmp_path / "chosen.json").exists()
    out = tmp_path / "calibration"
    result = runner.invoke(app, [
        "calibrate", str(tmp_path / "clip.mp4"), "--mask", str(tmp_path / "mask.mp4"), "-p", "a road", "--model",
        "tiny-random", "--steps", "4", "--search", "quick", "--target", "flops=0.6", "--device", "cpu",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["measured"]["flops_ratio"] <= 0.6 + 1e-9 and "--config" in result.stdout
    assert HetCacheConfig.from_file(out / "chosen.json").to_dict() == chosen["config"]
