"""HetCache under Ulysses context parallelism, over 2 and 4 CPU processes (gloo), against one process.

As in tests/test_parallel.py, each group of processes is forked once per module and runs every scenario; each rank
writes what it measured to a JSON file and the tests below judge those. A scenario's one-process reference is
computed by the same rank before it enables context parallelism.

Tolerance: the same as the stock context-parallel tests (1e-5 on transformer outputs of magnitude 2 to 20,
float32; 1 level of 255 on the frames): a rank's matmuls and attention see other row and head counts than one
process's, so results may differ in the last bits (measured: 0.0 everywhere but hetcache-fast on the tiny pipeline
over 4 processes, 1.1e-6 on the outputs and 1 level on the frames; docs/PARALLEL.md).
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist
from test_parallel import FRAME_TOLERANCE, TOLERANCE, run_ranks
from tiny_models import box_mask, tiny_inputs, tiny_transformer

import hetcache
from hetcache import flops, memory, parallel
from hetcache.errors import UserError
from hetcache.hooks import engine_of

GRID = (3, 4, 6)  # 72 tokens: 36 per rank on 2, 18 on 4
PLAN = "FPRPPRFP"  # FULL, PARTIAL and REUSE, a second selection at step 6
TIMESTEPS = (950.0, 900.0, 820.0, 700.0, 600.0, 480.0, 300.0, 150.0)
BRANCHES = ("cond", "uncond")
STEPS = 12  # hetcache-fast's budget in the F/P/R family at 12 steps plans FULL, PARTIAL and REUSE steps
FPR = {"max_reuse": 3, "max_step_fraction": None}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and "fork" in multiprocessing.get_all_start_methods()),
    reason="needs torch.distributed with gloo and forked processes",
)


# ----------------------------------------------------------------------------------------- inside each rank
def _mask() -> torch.Tensor:
    return box_mask(GRID, slice(1, 3), slice(1, 3))


def _config(**overrides) -> hetcache.HetCacheConfig:
    return hetcache.HetCacheConfig(**{"plan": PLAN, "margin": 1, "context_ratio": 0.3, "kmeans_clusters": 3,
                                      **overrides})


def _video(model: torch.nn.Module, config: hetcache.HetCacheConfig) -> dict:
    """Every step of PLAN with both CFG branches; outputs, rows per step, cache bytes by kind."""
    engine = hetcache.enable(model, config, mask=_mask())
    outputs, local_rows, seen = [], [], []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    text = {branch: tiny_inputs(7 + i)["encoder_hidden_states"] for i, branch in enumerate(BRANCHES)}
    for step, t in enumerate(TIMESTEPS):
        inputs = tiny_inputs(step)
        seen.clear()
        for branch in BRANCHES:
            with torch.no_grad(), model.cache_context(branch):
                out = model(**dict(inputs, encoder_hidden_states=text[branch]), timestep=torch.tensor([t]),
                            return_dict=False)[0]
            outputs.append(out)
        local_rows.append(seen[0] if seen else None)  # the rows the last main block ran on (none on REUSE)
    caches = [state.cache for state in engine.branches.values()]
    kv = sum(kv.nbytes() for cache in caches for kv in cache.kv.values())
    layer = caches[0].kv.get(("main", 0))
    stats = hetcache.stats(model)
    return {"outputs": outputs, "plan": stats.plan, "rows": stats.rows, "local_rows": local_rows,
            "kv_bytes": kv, "text_bytes": sum(c.text_nbytes() for c in caches), "cache_bytes": stats.cache_bytes,
            "residual_bytes": stats.cache_bytes - kv - sum(c.text_nbytes() for c in caches),
            "kv_shape": list(layer.buffers()[0].shape) if layer is not None else None}


def _hetcache(heads: int, **overrides) -> dict:
    config = _config(**overrides)
    reference = _video(tiny_transformer(heads=heads), config)
    model = tiny_transformer(heads=heads)
    parallel.enable_context_parallel(model)
    sharded = _video(model, config)
    ledger = parallel.ulysses_group(model).ledger
    shape = flops.ModelShape.from_config(model.config)
    estimate = memory.cache_bytes(shape, 72, config, dtype=torch.float32, text_len=8, shards=dist.get_world_size())
    sharded["estimate"] = estimate.total
    ours, theirs = sharded.pop("outputs"), reference.pop("outputs")
    return {"diff": max((a - b).abs().max().item() for a, b in zip(ours, theirs)),
            "scale": max(o.abs().max().item() for o in theirs),
            "one": reference, "cp": sharded, "calls": dict(ledger.calls), "per_call": ledger.per_call(),
            "last": {kind: [(c.op, c.numel) for c in calls] for kind, calls in ledger.last.items()}}


def _disagreement() -> str:
    """One rank has another plan: the first computed step stops every rank with a message."""
    model = tiny_transformer(heads=4)
    parallel.enable_context_parallel(model)
    plan = "FPRF" if dist.get_rank() == 0 else "FRPF"
    hetcache.enable(model, _config(plan=plan), mask=_mask())
    try:
        with torch.no_grad():
            model(**tiny_inputs(0), timestep=torch.tensor([900.0]), return_dict=False)
    except UserError as error:
        return str(error)
    return "no error"


def _baseline_refused() -> str:
    from hetcache.methods import method_config

    model = tiny_transformer(heads=4)
    parallel.enable_context_parallel(model)
    try:
        hetcache.enable(model, method_config("pab"))
    except UserError as error:
        return str(error)
    return "no error"


def _stock_after_disable() -> dict:
    """enable, disable: the stock split is back and the stock output is unchanged."""
    model = tiny_transformer(heads=4)
    inputs = tiny_inputs(0)
    with torch.no_grad():
        reference = model(**inputs, timestep=torch.tensor([500.0]), return_dict=False)[0]
    parallel.enable_context_parallel(model)
    hetcache.enable(model, _config(), mask=_mask())
    hetcache.disable(model)
    seen = []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = model(**inputs, timestep=torch.tensor([500.0]), return_dict=False)[0]
    return {"diff": (out - reference).abs().max().item(), "tokens": seen[0], "engine": engine_of(model) is None}


def _pipeline(heads: int = 2) -> dict:
    """hetcache-fast's budget in the F/P/R family on the tiny-random WanVACEPipeline (CFG, a budget plan, k-means
    and attention scores)."""
    from tiny_models import demo_clip, with_heads

    from hetcache.methods import method_config
    from hetcache.pipeline import load_pipeline, run_edit
    from hetcache.runner import check_fit

    pipe = load_pipeline("tiny-random", device="cpu", height=64, width=128)
    if heads != 2:
        with_heads(pipe, heads)
    video, mask = demo_clip(frames=9, height=64, width=128)
    outputs: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0]))

    def edit() -> tuple:
        outputs.clear()
        hetcache.enable(pipe, method_config("hetcache-fast", steps=STEPS, **FPR))
        frames = run_edit(pipe, video, mask, "an empty road", steps=STEPS, seed=0).frames
        stats = hetcache.stats(pipe)
        hetcache.disable(pipe)
        return frames, list(outputs), stats

    reference_frames, reference, one = edit()
    parallel.enable_context_parallel(pipe.transformer)
    frames, sharded, cp = edit()
    (estimate, _), = check_fit(pipe, [("hetcache-fast", method_config("hetcache-fast", steps=STEPS, **FPR))], 9, 64, 128,
                               guidance=5.0).values()
    return {"plan": cp.plan, "one_plan": one.plan, "rows": cp.rows, "one_rows": one.rows,
            "cache_bytes": cp.cache_bytes, "one_cache_bytes": one.cache_bytes, "estimate": estimate.total,
            "estimate_shards": estimate.shards,
            "calls": len(sharded), "diff": max((a - b).abs().max().item() for a, b in zip(sharded, reference)),
            "scale": max(a.abs().max().item() for a in reference),
            "frame_diff": int(abs(frames.astype(int) - reference_frames.astype(int)).max())}


SCENARIOS = {
    2: {
        "hetcache": lambda: _hetcache(heads=4),
        "padded": lambda: _hetcache(heads=2, context_ratio=0.2),  # |S| = 37: one padded row
        "pipeline": _pipeline,
        "teacache_like": lambda: _hetcache(heads=4, plan="FFRFRRF" + "F"),
        "forecast_ema": lambda: _hetcache(heads=2, reuse="linear", ema_alpha=0.3),
        "forecast": lambda: _hetcache(heads=2, reuse="linear"),
        "ema": lambda: _hetcache(heads=2, ema_alpha=0.3),
        "disagreement": _disagreement,
        "baseline_refused": _baseline_refused,
        "stock_after_disable": _stock_after_disable,
    },
    4: {
        "hetcache": lambda: _hetcache(heads=4),
        "padded": lambda: _hetcache(heads=4, context_ratio=0.2),  # |S| = 37: three padded rows on rank 3
        "pipeline": lambda: _pipeline(heads=4),
    },
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(SCENARIOS[2], 2, tmp_path_factory.mktemp("hc2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(SCENARIOS[4], 4, tmp_path_factory.mktemp("hc4"))


def _ranks(world_size, two_ranks, four_ranks) -> list[dict]:
    return {2: two_ranks, 4: four_ranks}[world_size]


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("scenario", ["hetcache", "padded"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_hetcache_under_context_parallelism_matches_one_process(world_size, scenario, two_ranks, four_ranks):
    for result in _ranks(world_size, two_ranks, four_ranks):
        run = result[scenario]
        assert set(run["one"]["plan"]) == set("FPR") and run["cp"]["plan"] == run["one"]["plan"] == PLAN
        assert run["cp"]["rows"] == run["one"]["rows"]
        assert run["scale"] > 1.0
        assert run["diff"] <= TOLERANCE


@pytest.mark.parametrize("world_size", [2, 4])
def test_plans_and_rows_are_the_same_on_every_rank(world_size, two_ranks, four_ranks):
    ranks = _ranks(world_size, two_ranks, four_ranks)
    for result in ranks[1:]:
        for scenario in ("hetcache", "padded"):
            assert result[scenario]["cp"]["plan"] == ranks[0][scenario]["cp"]["plan"]
            assert result[scenario]["cp"]["rows"] == ranks[0][scenario]["cp"]["rows"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_per_rank_cache_is_the_one_process_cache_divided_by_the_degree(world_size, two_ranks, four_ranks):
    for result in _ranks(world_size, two_ranks, four_ranks):
        one, cp = result["hetcache"]["one"], result["hetcache"]["cp"]
        assert cp["kv_bytes"] * world_size == one["kv_bytes"] > 0
        assert cp["residual_bytes"] * world_size == one["residual_bytes"] > 0
        assert cp["text_bytes"] == one["text_bytes"] > 0  # the text K/V stay whole on every rank
        assert cp["cache_bytes"] == (one["cache_bytes"] - one["text_bytes"]) // world_size + one["text_bytes"]
        assert cp["kv_shape"] == [1, 72, 4 // world_size, 8]  # every token, this rank's heads
        assert cp["estimate"] == cp["cache_bytes"]  # memory.cache_bytes(..., shards=P): what the fit checks


@pytest.mark.parametrize("world_size", [2, 4])
def test_selected_rows_spread_evenly_over_the_ranks(world_size, two_ranks, four_ranks):
    for result in _ranks(world_size, two_ranks, four_ranks):
        run = result["padded"]["cp"]
        for kind, rows, local in zip(PLAN, run["rows"], run["local_rows"]):
            assert local == (None if kind == "R" else -(-rows // world_size))


@pytest.mark.parametrize("world_size", [2, 4])
def test_partial_steps_move_only_their_rows(world_size, two_ranks, four_ranks):
    """The self-attention all-to-alls of a PARTIAL call carry the rank's ceil(|S| / P) rows (of width 32); a
    FULL call's carry its N / P; the exit moves the computed rows (without padding) to their chunks."""
    layers = 4 + 2
    for rank, result in enumerate(_ranks(world_size, two_ranks, four_ranks)):
        run = result["padded"]
        sizes = {kind: [numel for op, numel in run["last"][kind] if op == "all_to_all"] for kind in "FP"}
        assert sizes["F"] == [72 // world_size * 32] * 4 * layers
        per_rank = -(-37 // world_size)
        assert sizes["P"][:-1] == [per_rank * 32] * 4 * layers
        assert sizes["P"][-1] == max(0, min(per_rank, 37 - rank * per_rank)) * 32  # the exit


@pytest.mark.parametrize("world_size", [2, 4])
def test_reuse_steps_communicate_only_the_output_gather(world_size, two_ranks, four_ranks):
    for result in _ranks(world_size, two_ranks, four_ranks):
        run = result["hetcache"]
        assert run["last"]["R"] == [["all_gather", 72 // world_size * 64]]  # this rank's chunk of the output
        assert run["per_call"]["R"] == 72 // world_size * 64 * 4 * (world_size - 1)
        assert run["calls"] == {"F": 4, "P": 8, "R": 4}


@pytest.mark.parametrize("scenario", ["teacache_like", "forecast", "ema", "forecast_ema"])
def test_other_engine_settings_match_one_process(scenario, two_ranks):
    for result in two_ranks:
        run = result[scenario]
        assert run["cp"]["plan"] == run["one"]["plan"]
        assert run["diff"] <= TOLERANCE
    assert "P" not in two_ranks[0]["teacache_like"]["cp"]["plan"]  # the stock block forward on each rank's chunk


@pytest.mark.parametrize("world_size", [2, 4])
def test_tiny_pipeline_with_hetcache_fast_matches_one_process(world_size, two_ranks, four_ranks):
    for result in _ranks(world_size, two_ranks, four_ranks):
        run = result["pipeline"]
        assert set(run["plan"]) == set("FPR") and run["plan"] == run["one_plan"] and run["rows"] == run["one_rows"]
        assert any(rows % world_size for rows in run["rows"])  # a PARTIAL step with padded rows
        assert run["calls"] == 2 * len(run["plan"])
        # the fit check's estimate is one process's (the tiny text encoder's length differs from the estimate's)
        assert run["estimate_shards"] == world_size and run["cache_bytes"] < run["one_cache_bytes"]
        assert abs(run["estimate"] - run["cache_bytes"]) <= 0.05 * run["cache_bytes"]
        assert run["scale"] > 0.5
        assert run["diff"] <= TOLERANCE
        assert run["frame_diff"] <= FRAME_TOLERANCE


def test_ranks_that_disagree_stop_with_a_message(two_ranks):
    for result in two_ranks:
        message = result["disagreement"]
        assert message.startswith("the context-parallel processes disagree at step 0: rank 0 has plan ")
        assert "rank 1 has plan" in message and "FULL of all rows" in message


def test_baselines_without_context_parallelism_are_refused(two_ranks):
    for result in two_ranks:
        assert result["baseline_refused"] == (
            "PAB does not run under context parallelism: use hetcache, teacache, full or fewer-steps there, "
            "or one process"
        )


def test_disable_puts_the_stock_split_back(two_ranks):
    for result in two_ranks:
        run = result["stock_after_disable"]
        assert run["engine"] and run["tokens"] == 36 and run["diff"] <= TOLERANCE
