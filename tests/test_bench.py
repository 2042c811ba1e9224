"""The side-by-side benchmark on the tiny random pipeline: every file, the documented schema, shared inputs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hetcache import bench as bench_module
from hetcache import HetCacheConfig
from hetcache.bench import COLUMNS, RESULT_FILES, bench_main, parse_methods, plan_main, plan_table, run_bench
from hetcache.errors import UserError
from hetcache.methods import method_config
from hetcache.pipeline import build_tiny_random_pipeline
from hetcache.video import prepare_inputs, read_frames
from tiny_models import demo_clip

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "RESULTS_SCHEMA.md"
TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def schema_tables() -> list[dict[str, tuple[str, bool]]]:
    """The doc's `| field | type | meaning |` tables, in order: field -> (type, nullable)."""
    tables, current = [], None
    for line in SCHEMA_DOC.read_text().splitlines():
        if line.startswith("| field | type |"):
            current = {}
            tables.append(current)
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            kind = cells[1]
            current[cells[0].strip("`")] = (kind.removesuffix(" or null"), kind.endswith(" or null"))
        elif current is not None and not line.startswith("|"):
            current = None
    return tables


def check(obj: dict, table: dict[str, tuple[str, bool]], where: str) -> None:
    assert set(obj) == set(table), f"{where}: fields {sorted(set(obj) ^ set(table))} differ from the doc"
    for key, (kind, nullable) in table.items():
        value = obj[key]
        if value is None:
            assert nullable, f"{where}.{key} is null but the doc says {kind}"
            continue
        assert isinstance(value, TYPES[kind]), f"{where}.{key} = {value!r} is not {kind}"
        if kind in ("integer", "number"):
            assert not isinstance(value, bool), f"{where}.{key} is a boolean"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pipe = build_tiny_random_pipeline()
    video, mask = demo_clip(frames=9, height=32, width=64)
    out = tmp_path_factory.mktemp("bench")
    lines = []
    methods = ["full", ("fewer-steps", method_config("fewer-steps", never_skip=True)), "pab", "diffusers-fbc",
               "cache-dit"]
    results = run_bench(pipe, video, mask, "an empty road", methods, steps=3, seed=0, guidance=5.0, out_dir=out,
                        fps=8.0, progress=lines.append)
    return results, out, lines


def test_every_file_is_written(bench):
    _, out, _ = bench
    for name in RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_json_follows_the_documented_schema(bench):
    _, out, _ = bench
    results = json.loads((out / "results.json").read_text())
    top, settings, record = schema_tables()
    check(results, top, "results")
    assert results["schema"] == "hetcache-bench/1"
    check(results["settings"], settings, "settings")
    for method in results["methods"]:
        check(method, record, method["name"])
    assert [m["name"] for m in results["methods"]] == ["full", "fewer-steps", "pab", "diffusers-fbc"]
    for skipped in results["skipped"]:
        assert set(skipped) == {"name", "reason"}


def test_csv_has_one_row_per_method_with_the_documented_columns(bench):
    results, out, _ = bench
    _, _, record = schema_tables()
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS == tuple(k for k in record if k not in ("config", "notes"))
    assert [r[0] for r in rows[1:]] == [m["name"] for m in results["methods"]]


def test_markdown_and_progress_name_every_method(bench):
    results, out, lines = bench
    report = (out / "results.md").read_text()
    for method in results["methods"]:
        assert f"| `{method['name']}` |" in report
    rows = [line for line in lines if not line.startswith("warning: ")]  # speedup warnings depend on the timing
    assert len(rows) == len(results["methods"]) + len(results["skipped"])
    assert [line.split()[0] for line in rows][:4] == ["full", "fewer-steps", "pab", "diffusers-fbc"]


def test_methods_share_inputs_seed_and_latents(bench):
    results, _, _ = bench
    methods = {m["name"]: m for m in results["methods"]}
    # fewer-steps at a fraction of 1 is `full` again: identical only if the inputs and latents are the same
    assert methods["fewer-steps"]["identical"] and methods["full"]["identical"]
    assert methods["full"]["speedup"] == 1.0 and methods["full"]["flops_ratio"] == 1.0
    assert methods["full"]["psnr_frame"] is None and methods["full"]["ssim_frame"] == pytest.approx(1.0)
    pab = methods["pab"]
    assert not pab["identical"] and pab["flops_ratio"] < 1 and pab["psnr_frame"] > 0
    assert len(pab["plan"]) == pab["steps"] == 3


def test_side_by_side_is_a_grid_of_every_output(bench):
    results, out, _ = bench
    clip = read_frames(out / "side_by_side.mp4")
    panels = 1 + len(results["methods"])  # the input, then each method
    columns = int(np.ceil(np.sqrt(panels)))
    rows = int(np.ceil(panels / columns))
    assert clip.frames.shape == (9, rows * 32, columns * 64, 3)


def test_missing_peer_is_skipped_with_a_reason(bench):
    import importlib.util

    results, _, _ = bench
    if importlib.util.find_spec("cache_dit") is not None:
        pytest.skip("cache-dit is installed here")
    assert results["skipped"] == [{"name": "cache-dit", "reason": results["skipped"][0]["reason"]}]
    assert "not installed" in results["skipped"][0]["reason"]


def test_parse_methods_puts_full_first_and_rejects_unknown_names():
    assert parse_methods("pab, teacache,pab") == ["full", "pab", "teacache"]
    assert parse_methods("all")[0] == "full" and "cache-dit" in parse_methods("all")
    with pytest.raises(UserError, match="unknown method 'tea'.*teacache"):
        parse_methods("full,tea")


def test_plan_table_previews_plans_and_costs():
    pipe = build_tiny_random_pipeline()
    mask = torch.zeros(9, 128, 224, dtype=torch.bool)
    mask[:, 32:96, 64:160] = True
    table = plan_table(pipe, 20, "fewer-steps,pab,hetcache-fast,adacache", mask=mask, text_len=16)
    rows = {r["name"]: r for r in table}
    assert rows["full"]["plan"] == "F" * 20 and rows["full"]["flops_ratio"] == 1.0
    assert rows["fewer-steps"]["plan"] == "F" * 10 and rows["fewer-steps"]["flops_ratio"] == 0.5
    assert len(rows["pab"]["plan"]) == 20 and 0 < rows["pab"]["flops_ratio"] < 1
    assert re.fullmatch("F[FPR]*F", rows["hetcache-fast"]["plan"]) and rows["hetcache-fast"]["flops_ratio"] < 1
    assert rows["adacache"]["plan"] is None and "adaptive" in rows["adacache"]["note"]


def test_plan_main_prints_one_line_per_method(capsys):
    plan_main("tiny-random", 12, "pab,hetcache-slow", None, 0.6, 9, 64, 96, None)
    out = capsys.readouterr().out
    assert re.search(r"^full +1\.000  F{12}$", out, re.M)
    assert re.search(r"^pab ", out, re.M) and re.search(r"^hetcache-slow +0\.\d+  [FP]{1,12}$", out, re.M)
    with pytest.raises(UserError, match="--delta and --budget"):
        plan_main("tiny-random", 12, "pab", 0.1, 0.5, 9, 64, 96, None)
    with pytest.raises(UserError, match="unknown method"):
        plan_main("tiny-random", 12, "nope", None, None, 9, 64, 96, None)


def test_bench_main_writes_every_file(clip_files, tmp_path, capsys):
    video, mask = clip_files
    out = tmp_path / "out"
    prepared = prepare_inputs(video, mask)
    bench_main(prepared, "an empty road", "", "pab", "tiny-random", 2, 0, 5.0, "cpu", "auto", out, None)
    for name in RESULT_FILES:
        assert (out / name).is_file()
    assert "| `pab` |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["full", "pab"]


def test_bench_main_rejects_bad_input(clip_files, tmp_path):
    prepared = prepare_inputs(*clip_files)
    args = ("", "pab", "tiny-random", 2, 0, 5.0, "cpu", "auto")
    with pytest.raises(UserError, match="unknown method"):
        bench_main(prepared, "an empty road", "", "full,nope", "tiny-random", 2, 0, 5.0, "cpu", "auto", tmp_path, None)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        bench_main(prepared, "an empty road", *args, file, None)
    with pytest.raises(UserError, match="prompt"):
        bench_main(prepared, " ", *args, tmp_path, None)


# ------------------------------------------------------------------------------------------------ like for like
@pytest.fixture(scope="module")
def fair(tmp_path_factory):
    pipe = build_tiny_random_pipeline()
    video, mask = demo_clip(frames=9, height=32, width=64)
    out = tmp_path_factory.mktemp("fair")
    methods = ["fewer-steps", "hetcache-fast", "fastcache-style", "diffusers-fbc"]
    results = run_bench(pipe, video, mask, "an empty road", methods, steps=6, seed=0, guidance=5.0, out_dir=out,
                        fps=8.0, progress=None,
                        method_options={"diffusers-fbc": {"threshold": 0.3}, "fewer-steps": {"steps_fraction": 0.25}})
    return results, out


def test_fewer_steps_also_runs_at_each_hetcache_rows_flops(fair):
    results, _ = fair
    rows = {r["name"]: r for r in results["methods"]}
    share = rows["hetcache-fast"]["flops_ratio"]
    matched = f"fewer-steps@{share:.2f}"
    assert list(rows) == ["full", "fewer-steps", "hetcache-fast", "fastcache-style", "diffusers-fbc", matched]
    assert rows[matched]["steps"] == round(6 * share) != rows["fewer-steps"]["steps"]
    assert rows[matched]["flops_ratio"] == pytest.approx(rows[matched]["steps"] / 6)
    assert rows[matched]["plan"] == "F" * rows[matched]["steps"] and rows[matched]["flag"] is None


def test_matched_fewer_steps_skip_step_counts_that_ran():
    records = [{"name": "full", "steps": 20, "flops_ratio": 1.0}, {"name": "fewer-steps", "steps": 10, "flops_ratio": 0.5},
               {"name": "hetcache-slow", "steps": 20, "flops_ratio": 0.42}, {"name": "hetcache-fast", "steps": 20,
                                                                             "flops_ratio": 0.33},
               {"name": "hetcache", "steps": 20, "flops_ratio": 0.51}, {"name": "pab", "steps": 20, "flops_ratio": 0.3}]
    matched = bench_module._matched_baselines(records, ["full", "fewer-steps", "hetcache-slow"], 20)
    assert [(name, config.steps_fraction) for name, config in matched] == [("fewer-steps@0.42", 8 / 20),
                                                                          ("fewer-steps@0.33", 7 / 20)]
    assert bench_module._matched_baselines(records, ["full", "hetcache-slow"], 20) == []


def test_flags_are_in_every_output_format(fair):
    results, out = fair
    flagged = {"fastcache-style": "deviation", "diffusers-fbc": "wrong on VACE"}
    records = {r["name"]: r for r in json.loads((out / "results.json").read_text())["methods"]}
    with open(out / "results.csv", newline="") as handle:
        csv_rows = {row["name"]: row for row in csv.DictReader(handle)}
    report = (out / "results.md").read_text()
    for name, record in records.items():
        word = flagged.get(name)
        assert (record["flag"] or "").startswith(word or "") and (record["flag"] is None) == (word is None), name
        assert csv_rows[name]["flag"] == (record["flag"] or ""), name
        row = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.endswith(f"| {word or '-'} |"), row
        if word:
            assert f"- `{name}`: {record['flag']}" in report
    labels = bench_module._write_pareto(out / "again.png", results["methods"])
    assert {label for label in labels if "[" in label} == {f"{n} [{w}]" for n, w in flagged.items()}


def test_method_options_reach_the_configs_and_unknown_ones_are_refused(fair):
    results, out = fair
    rows = {r["name"]: r for r in results["methods"]}
    assert rows["diffusers-fbc"]["config"]["options"] == {"threshold": 0.3}
    pipe = build_tiny_random_pipeline()
    video, mask = demo_clip(frames=9, height=32, width=64)
    for options, message in (({"pab": {"rnage": 2}}, "unknown option 'rnage' for pab"),
                             ({"teacache": {"delta": 0.1}}, "not among the methods run")):
        with pytest.raises(UserError, match=message):
            run_bench(pipe, video, mask, "a road", ["pab"], steps=2, out_dir=out / "x", method_options=options)
    assert not (out / "x").exists()


def test_compile_compiles_the_reference_and_every_method_the_same_way(tmp_path, monkeypatch):
    """torch.compile is replaced by a recorder that returns the function unchanged: this checks the wiring."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(getattr(fn, "__name__", fn)) or fn)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 8  # dynamo's default
    pipe = build_tiny_random_pipeline()
    video, mask = demo_clip(frames=9, height=32, width=64)
    try:
        results = run_bench(pipe, video, mask, "a road", ["hetcache-fast"], steps=4, out_dir=tmp_path, compile=True,
                            progress=None)
        raised = torch._dynamo.config.recompile_limit
    finally:
        torch._dynamo.config.recompile_limit = limit
    blocks = len(pipe.transformer.blocks) + len(pipe.transformer.vace_blocks)
    assert compiled.count("forward") == blocks  # every block once, before any method
    assert raised >= 64  # room for VACE block 0's and in-block hooks' variants
    assert {"block_rows", "vace_block_rows"} <= set(compiled)  # the engine's own maths
    assert results["settings"]["compile"] and "untimed" in results["settings"]["warmup"]
    assert results["methods"][1]["config"]["compile"] is True
    run_bench(pipe, video, mask, "a road", ["pab"], steps=2, out_dir=tmp_path, compile=True, progress=None)
    assert compiled.count("forward") == blocks  # a compiled pipeline is not compiled again


def test_plan_of_the_proxy_uses_its_clip_and_loads_only_its_transformer(capsys, monkeypatch):
    import diffusers

    for component in ("AutoencoderKLWan", "WanVACEPipeline"):
        monkeypatch.setattr(getattr(diffusers, component), "from_pretrained",
                            classmethod(lambda cls, *a, **k: pytest.fail(f"{cls.__name__} was loaded")))
    monkeypatch.setattr("transformers.UMT5EncoderModel.from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("the text encoder was loaded")))
    plan_main("proxy", 20, "hetcache-slow", None, None, None, None, None, None)
    out = capsys.readouterr().out
    assert out.startswith("proxy: 17 frames at 256x256, 20 steps")
    assert re.search(r"^memory: hetcache-slow: cache \d+\.\d\d GiB .* at 1 CFG branch$", out, re.M)


def test_plan_of_an_uncached_hub_id_offline_says_why_at_once(monkeypatch):
    from hetcache import pipeline

    monkeypatch.setattr(pipeline.hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="was not found locally and the hub is unreachable: .*hf download"):
        plan_main("hetcache-tests/no-such-model", 20, "full", None, None, 5, 32, 32, None)


def test_plan_of_two_experts_shows_the_switch_of_every_row(capsys):
    import hetcache

    steps = 20
    plan_main("tiny-random-moe", steps, "hetcache-fast,pab", None, None, 9, 32, 64, None)
    out = capsys.readouterr().out
    pipe = build_tiny_random_pipeline(two_experts=True)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
    assert list(rows) == ["full", "hetcache-fast", "pab"]
    for fields in rows.values():
        letters, switch = fields[2], int(fields[-1])
        assert fields[-4:-1] == ["switch", "at", "step"]
        assert switch == hetcache.expert_switch(pipe, len(letters)) and letters[switch] == "F"
    assert len(rows["hetcache-fast"][2]) < steps  # fewer solver steps: its switch is counted in them
    assert "experts: transformer runs the steps at t >= 875, transformer_2 from the switch step" in out


def test_plan_shows_the_cache_estimate_in_the_dtype_asked_for(capsys):
    from hetcache.memory import estimate_memory

    plan_main("tiny-random", 12, "hetcache-slow", None, None, 9, 64, 96, None, cache_dtype="float8_e4m3fn")
    out = capsys.readouterr().out
    transformer = build_tiny_random_pipeline().transformer
    expected = estimate_memory(transformer, 9, 64, 96, HetCacheConfig.slow(cache_dtype=torch.float8_e4m3fn),
                               text_len=16)
    assert f"memory: hetcache-slow: {expected.describe()} at 2 CFG branches" in out
    assert expected.kv_bytes * 2 == estimate_memory(transformer, 9, 64, 96, HetCacheConfig.slow(), text_len=16,
                                                    dtype=torch.bfloat16).kv_bytes


@pytest.mark.parametrize(("args", "message"), [((None, 16000, None), "pixels per frame, more than"),
                                               ((4097, None, None), "more than the 4093 Wan's rotary table covers")])
def test_plan_refuses_sizes_beyond_the_models_limits(args, message):
    frames, height, width = args
    with pytest.raises(UserError, match=message):
        plan_main("tiny-random", 4, "full", None, None, frames, height, width, None)
