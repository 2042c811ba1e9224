"""`--config FILE` on edit, bench, sweep and eval: a HetCache config file (`hetcache calibrate`'s chosen.json, or
`HetCacheConfig.to_dict()`) sets the hetcache method's config; the cache flags and `--method-option` override its
fields; a bad file, or no hetcache method to apply it to, is one `error:` line with exit 2 before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hetcache import cli, pipeline
from hetcache.calibrate import METHOD, config_options
from hetcache.cli import app
from hetcache.config import HetCacheConfig
from hetcache.options import over_config

TINY = ["--model", "tiny-random", "--steps", "4", "--device", "cpu"]
PLAN = "FPRF"

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_config(path: Path, config: HetCacheConfig, *, chosen: bool = False) -> Path:
    """`config` as `hetcache calibrate` writes chosen.json (`chosen`) or as `to_dict` gives it."""
    data = {"target": "flops<=0.5", "config": config.to_dict(), "measured": {}} if chosen else config.to_dict()
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def dataset(clip_files, tmp_path) -> Path:
    item = tmp_path / "data" / "clip0"
    item.mkdir(parents=True)
    for name, path in (("video.mp4", clip_files[0]), ("mask.mp4", clip_files[1])):
        shutil.copyfile(path, item / name)
    (item / "prompt.txt").write_text("an empty road\n")
    return tmp_path / "data"


def test_the_method_the_cli_names_is_calibrates():
    assert cli.CONFIG_METHOD == METHOD


@pytest.mark.parametrize("config", [
    HetCacheConfig(), HetCacheConfig(budget=0.3, step_fraction=0.5, max_reuse=0),
    HetCacheConfig(plan=PLAN, cache_dtype=torch.float8_e4m3fn, margin_ratio=0.35),
    HetCacheConfig(delta=0.0, budget=None, step_fraction=0.25, reuse="linear"),
], ids=["defaults", "budget", "plan", "fewer-steps"])
def test_a_files_options_rebuild_its_config(config, tmp_path):
    path = write_config(tmp_path / "c.json", config, chosen=True)
    options = config_options(path)
    assert HetCacheConfig(**options) == config
    assert json.loads(json.dumps(options)) == options  # JSON-ready: it goes into eval's resume key
    assert set(options) <= {k for k, v in config.to_dict().items() if v != HetCacheConfig().to_dict()[k]}


def test_options_that_decide_the_plan_replace_the_files_way_of_deciding_it():
    fields = {"plan": PLAN, "budget": None, "margin_ratio": 0.35}
    assert over_config(fields, {"budget": 0.5}) == {"margin_ratio": 0.35, "budget": 0.5}
    assert over_config(fields, {"margin_ratio": 0.5, "cache_device": "cpu"}) == {
        "plan": PLAN, "budget": None, "margin_ratio": 0.5, "cache_device": "cpu"}


# ------------------------------------------------------------------------------------------------ each command
def test_edit_runs_the_files_config_as_hetcache(clip_files, tmp_path):
    path = write_config(tmp_path / "chosen.json", HetCacheConfig(plan=PLAN), chosen=True)
    args = ["edit", clip_files[0], "--mask", clip_files[1], "-p", "a road", "-o", tmp_path / "o.mp4", *TINY,
            "--config", path]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"method   hetcache: plan {PLAN} (4 steps)" in result.stdout  # no --method: --config picks hetcache
    result = invoke(*args, "--method", "hetcache", "--method-option", "hetcache.plan=FFRF")
    assert result.exit_code == 0, result.output
    assert "method   hetcache: plan FFRF (4 steps)" in result.stdout


def test_bench_takes_the_files_fields_and_the_flags_over_them(clip_files, tmp_path):
    path = write_config(tmp_path / "c.json", HetCacheConfig(plan=PLAN, cache_dtype=torch.float8_e4m3fn,
                                                            margin_ratio=0.35))
    out = tmp_path / "bench"
    result = invoke("bench", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, *TINY,
                    "--methods", "full,hetcache,hetcache-fast", "--config", path, "--cache-dtype", "bfloat16",
                    "--cache-device", "cpu")
    assert result.exit_code == 0, result.output
    records = {m["name"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    expected = HetCacheConfig(plan=PLAN, margin_ratio=0.35, cache_dtype=torch.bfloat16, cache_device="cpu")
    assert records["hetcache"]["config"] == expected.to_dict() and records["hetcache"]["plan"] == PLAN
    assert records["hetcache-fast"]["config"]["margin_ratio"] != 0.35  # the file is hetcache's only


def test_sweep_grids_around_the_files_config(clip_files, tmp_path):
    path = write_config(tmp_path / "c.json", HetCacheConfig(plan=PLAN, margin_ratio=0.35))
    out = tmp_path / "sweep"
    result = invoke("sweep", clip_files[0], "--mask", clip_files[1], "-p", "a road", "--out", out, *TINY,
                    "--methods", "hetcache", "--grid", "hetcache.budget=0.5,1.0", "--config", path)
    assert result.exit_code == 0, result.output
    points = [p for p in json.loads((out / "results.json").read_text())["points"] if p["method"] == METHOD]
    assert sorted(p["options"]["budget"] for p in points) == [0.5, 1.0]
    for point in points:  # the grid decides the plan; the file's other fields stay
        assert point["options"]["margin_ratio"] == 0.35 and "plan" not in point["options"]
    runs = [json.loads(p.read_text()) for p in (out / "runs").rglob("hetcache*.json")]
    assert len(runs) == 2 and all(r["key"]["config"]["margin_ratio"] == 0.35 for r in runs)


def test_eval_runs_the_files_config_and_reruns_an_item_when_the_file_changes(dataset, tmp_path):
    path = write_config(tmp_path / "c.json", HetCacheConfig(plan=PLAN))
    out = tmp_path / "out"
    args = ["eval", "--dataset", dataset, "--out", out, "--methods", "full,hetcache", *TINY, "--config", path]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "items" / "clip0" / "result.json").read_text())
    assert {row["method"]: row["plan"] for row in record["rows"]}["hetcache"] == PLAN
    assert "clip0: done earlier, skipped" in invoke(*args).stderr
    write_config(path, HetCacheConfig(plan="FRRF"))
    result = invoke(*args)
    assert result.exit_code == 0 and "clip0: done earlier" not in result.stderr, result.output
    record = json.loads((out / "items" / "clip0" / "result.json").read_text())
    assert {row["method"]: row["plan"] for row in record["rows"]}["hetcache"] == "FRRF"


# ------------------------------------------------------------------------------------------------ bad files
BAD_FILES = {
    "missing": (None, "config file {path} does not exist"),
    "not json": (b"budget: 0.3", "is not a HetCache config: Expecting value"),
    "not an object": (b"[0.3]", "is not a HetCache config: "),
    "unknown field": (b'{"budjet": 0.3}', "is not a HetCache config: unknown HetCacheConfig field(s): budjet"),
    "bad value": (b'{"budget": 2}', "is not a HetCache config: budget must be in (0, 1], got 2"),
    "two plan sources": (b'{"budget": 0.3, "delta": 0.1}', "is not a HetCache config: "),
    "bad dtype": (b'{"cache_dtype": "int8"}', "is not a HetCache config: cache_dtype 'int8'"),
    "not utf-8": ('{"plan": "caf\u00e9"}'.encode("latin-1"), "is not a HetCache config: "),
}


def _commands(clip_files, dataset: Path, out: Path) -> dict[str, list]:
    video, mask = clip_files
    clip = [video, "--mask", mask, "-p", "a road"]
    return {
        "edit": ["edit", *clip, "-o", out / "o.mp4"],
        "bench": ["bench", *clip, "--out", out, "--methods", "full,hetcache"],
        "sweep": ["sweep", *clip, "--out", out, "--methods", "hetcache"],
        "eval": ["eval", "--dataset", dataset, "--out", out, "--methods", "full,hetcache"],
    }


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(pipeline, "build_tiny_random_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("command", ["edit", "bench", "sweep", "eval"])
def test_a_bad_config_file_is_one_line_before_any_model_loads(command, case, clip_files, dataset, tmp_path,
                                                              no_model):
    content, expected = BAD_FILES[case]
    path = tmp_path / "c.json"
    if content is not None:
        path.write_bytes(content)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(*_commands(clip_files, dataset, tmp_path / "out")[command], *TINY, "--config", path)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected.format(path=path) in result.stderr, result.stderr
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(("command", "methods"), [("edit", ["--method", "hetcache-fast"]),
                                                  ("bench", ["--methods", "full,teacache"]),
                                                  ("sweep", ["--methods", "teacache"]),
                                                  ("eval", [])])
def test_a_config_file_needs_the_hetcache_method(command, methods, clip_files, dataset, tmp_path, no_model):
    path = write_config(tmp_path / "c.json", HetCacheConfig(plan=PLAN))
    args = _commands(clip_files, dataset, tmp_path / "out")[command]
    if "--methods" in args:  # replace the command's methods (eval: its default, which has no hetcache)
        index = args.index("--methods")
        del args[index:index + 2]
    result = invoke(*args, *methods, *TINY, "--config", path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"error: --config {path} sets the hetcache method's config, and hetcache is not among the methods" \
        in result.stderr
    assert not (tmp_path / "out").exists()
