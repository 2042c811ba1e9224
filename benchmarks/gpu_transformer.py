"""Real-size speed of the HetCache engine on one GPU: per-forward times, selection overhead, denoising loops.

Setting (issue 5): the Wan2.1-VACE-1.3B transformer configuration with random weights in bf16 (timings do not
depend on the weights), 480x832, 33 frames (9 x 30 x 52 = 14,040 tokens), 512 text tokens, 50 steps with CFG
(two transformer calls per step). Plans are fixed strings. Partitions come from the driving mask
(benchmarks/data/driving_coverage_33x480x832.pt, token coverage of ../shared/data/driving_mask.mp4 fitted to
480x832) plus boxes of a given row fraction.

    python benchmarks/gpu_transformer.py --out results.json          # on the GPU (about 6 minutes on an H100)
    python benchmarks/gpu_transformer.py --smoke --out smoke.json    # tiny shapes on the CPU (tests use this)

Prints a table last and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import diffusers  # noqa: E402
from diffusers import WanVACETransformer3DModel  # noqa: E402

import hetcache  # noqa: E402
from hetcache import flops, sparse, store  # noqa: E402
from hetcache.hooks import engine_of  # noqa: E402

COVERAGE_FILE = Path(__file__).resolve().parent / "data" / "driving_coverage_33x480x832.pt"

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, vace_layers=list(range(0, 30, 2)),
    vace_in_channels=96,
)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=4,
            vace_layers=[0, 2])

# 50-step plans written out (F: full, P: partial, R: reuse).
PLANS = {
    "dense": "F" * 50,
    "teacache-like": "FFFRFRFRRFRRFRRFRRFRRFRRFRRFRRFRRFRRFRRFRFRFRFRFFF",
    "hetcache-A": "FFFRPRPRRPRRFRRPRRPRRFRRPRRPRRFRRPRRPRRFRPRPRFRPFF",
    "hetcache-B": "FFRRPRRPRRRPRRRFRRPRRRPRRRFRRRPRRRPRRRFRRPRRPRRPFF",
}


@dataclass
class Setting:
    device: torch.device
    dtype: torch.dtype
    config: dict
    grid: tuple[int, int, int]
    text_len: int
    steps: int
    repeats: int
    big_block: dict | None


def real_setting() -> Setting:
    big = dict(dim=5120, heads=40, ffn=13824, grid=(21, 30, 52), text_len=512)
    return Setting(torch.device("cuda"), torch.bfloat16, WAN_1_3B, (9, 30, 52), 512, 50, 10, big)


def smoke_setting() -> Setting:
    big = dict(dim=64, heads=4, ffn=128, grid=(3, 6, 8), text_len=8)
    return Setting(torch.device("cpu"), torch.float32, TINY, (3, 6, 8), 8, 50, 2, big)


def build_model(setting: Setting) -> WanVACETransformer3DModel:
    torch.manual_seed(0)
    with torch.device(setting.device):
        model = WanVACETransformer3DModel(**setting.config)
    model.to(setting.dtype)
    for name, module in model.named_modules():  # what from_pretrained(torch_dtype=bf16) keeps in float32
        if any(key in name.split(".") for key in model._keep_in_fp32_modules):
            module.float()
    return model.eval()


def make_inputs(setting: Setting, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator(setting.device).manual_seed(seed)
    frames, height, width = setting.grid[0], setting.grid[1] * 2, setting.grid[2] * 2
    text_dim = setting.config["text_dim"]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=setting.device).to(setting.dtype)

    return {
        "hidden_states": randn(1, 16, frames, height, width),
        "control_hidden_states": randn(1, 96, frames, height, width),
        "encoder_hidden_states": randn(1, setting.text_len, text_dim),
    }


def box_coverage(grid: tuple[int, int, int], fraction: float) -> torch.Tensor:
    """A centred box of about `fraction` of every frame's tokens."""
    frames, height, width = grid
    rows = max(1, min(height, round(height * fraction**0.5)))
    cols = max(1, min(width, round(height * width * fraction / rows)))
    coverage = torch.zeros(grid)
    top, left = (height - rows) // 2, (width - cols) // 2
    coverage[:, top : top + rows, left : left + cols] = 1.0
    return coverage


def driving_coverage(grid: tuple[int, int, int]) -> torch.Tensor:
    coverage = torch.load(COVERAGE_FILE).float()
    if tuple(coverage.shape) != grid:  # smoke sizes: nearest resize of the same mask
        coverage = torch.nn.functional.interpolate(coverage[None, None], size=grid, mode="nearest")[0, 0]
    return coverage


class Timer:
    """Median wall time of a callable: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)


def forward(model, inputs, t: float = 500.0, branch: str = "cond"):
    with model.cache_context(branch):
        return model(timestep=torch.tensor([t], device=inputs["hidden_states"].device), return_dict=False, **inputs)[0]


def engine_forward_times(model, inputs, setting: Setting, timer: Timer, compile: bool = False,
                         graphs: bool = False) -> dict:
    """Stock vs engine FULL vs PARTIAL (row-fraction sweep and the driving mask) vs REUSE, one branch.

    With `graphs` (`HetCacheConfig(cuda_graphs=True)`), PARTIAL steps of at most graphs.MAX_ROW_SHARE of the tokens
    replay CUDA graphs and FULL steps then write K/V in place: FULL is timed on a small mask so that it does.
    Each PARTIAL row records whether graphs were active.
    """
    n = setting.grid[0] * setting.grid[1] * setting.grid[2]
    out: dict = {"tokens": n, "compile": compile, "cuda_graphs": graphs}
    call = lambda: forward(model, inputs)  # noqa: E731
    out["stock_s"] = timer(call, setting.repeats, warmup=2)
    reference = call().float()

    many = setting.repeats + 4
    sweep_config = dict(margin=0, margin_ratio=0.0, context_ratio=0.0, selection="uniform", compile=compile,
                        cuda_graphs=graphs)
    fractions = (0.75, 0.5, 0.3, 0.15) if not compile else (0.5, 0.3, 0.15)

    hetcache.enable(model, hetcache.HetCacheConfig(plan="F" * many + "P", **sweep_config),
                    token_mask=box_coverage(setting.grid, 0.15 if graphs else 0.5))
    call()
    out["engine_full_graphs_active"] = engine_of(model).graphs_active
    out["engine_full_s"] = timer(call, setting.repeats, warmup=3 if compile else 2)
    got = call().float()
    out["engine_full_rel_err"] = float((got - reference).norm() / reference.norm())
    hetcache.disable(model)

    out["partial"] = []
    for fraction in fractions:
        hetcache.enable(model, hetcache.HetCacheConfig(plan="F" + "P" * many, **sweep_config),
                        token_mask=box_coverage(setting.grid, fraction))
        call()
        seconds = timer(call, setting.repeats, warmup=2 if compile or graphs else 1)
        rows = hetcache.stats(model).rows[-1]
        active = engine_of(model).graphs_active
        hetcache.disable(model)
        out["partial"].append({"mask": f"box {fraction:.2f}", "rows": rows, "r": rows / n, "seconds": seconds,
                               "graphs_active": active})

    hetcache.enable(model, hetcache.HetCacheConfig(plan="F" + "R" * many, **sweep_config),
                    token_mask=box_coverage(setting.grid, 0.5))
    call()
    out["reuse_s"] = timer(call, setting.repeats, warmup=1)
    hetcache.disable(model)
    if compile:
        return out
    driving = hetcache.HetCacheConfig(plan="F" + "P" * many, margin=3, cuda_graphs=graphs)
    hetcache.enable(model, driving, token_mask=driving_coverage(setting.grid))
    call()
    seconds = timer(call, setting.repeats, warmup=2 if graphs else 1)
    stats = hetcache.stats(model)
    active = engine_of(model).graphs_active
    hetcache.disable(model)
    out["partial"].append({"mask": "driving (margin 3, rho_m 0.7, rho_c 0.05)", "rows": stats.rows[-1],
                           "r": stats.rows[-1] / n, "seconds": seconds, "tokens": stats.tokens,
                           "graphs_active": active})
    if graphs:
        return out

    # Selection overhead: a FULL step that clusters and scores context tokens vs one that does not.
    selecting = hetcache.HetCacheConfig(plan="F" * many + "P", margin=3, cuda_graphs=False)
    hetcache.enable(model, selecting, token_mask=driving_coverage(setting.grid))
    engine = engine_of(model)

    def full_with_selection() -> None:
        if engine.session is not None:
            engine.session.selection_step = -1  # force the selection at every call
        call()

    out["full_with_selection_s"] = timer(full_with_selection, setting.repeats, warmup=2)
    hetcache.disable(model)
    hetcache.enable(model, hetcache.HetCacheConfig(plan="F" * many + "P", margin=3, selection="uniform",
                                                   cuda_graphs=False),
                    token_mask=driving_coverage(setting.grid))
    out["full_uniform_selection_s"] = timer(call, setting.repeats, warmup=2)
    hetcache.disable(model)
    out["selection_overhead"] = out["full_with_selection_s"] / out["full_uniform_selection_s"] - 1.0
    out["selection_parts"] = selection_parts(model, inputs, setting, timer)
    return out


GRAPH_CHECK_PLAN = "FPPFPRPP"


def graph_check(model, inputs, setting: Setting) -> dict:
    """PARTIAL steps replayed from CUDA graphs give the outputs of the same steps run eagerly (bitwise on the GPU:
    the same kernels on the same inputs). Both CFG branches, EMA blending, a FULL step (with a new context
    selection, written in place) and a REUSE step between replays; new latents and timesteps at every step.
    A 0.1 box with a 2-token margin: PARTIAL steps of about 0.2 of the tokens."""
    uncond = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].flip(1))

    def run(graphs: bool) -> tuple[list[torch.Tensor], int, list[int]]:
        config = hetcache.HetCacheConfig(plan=GRAPH_CHECK_PLAN, margin=2, ema_alpha=0.3, cuda_graphs=graphs)
        hetcache.enable(model, config, token_mask=box_coverage(setting.grid, 0.1))
        outputs = []
        for step in range(len(GRAPH_CHECK_PLAN)):
            latents = make_inputs(setting, seed=100 + step)["hidden_states"]
            t = 900.0 - 100.0 * step
            outputs.append(forward(model, dict(inputs, hidden_states=latents), t, "cond"))
            outputs.append(forward(model, dict(uncond, hidden_states=latents), t, "uncond"))
        captured = len(engine_of(model).graphs or ())
        rows = hetcache.stats(model).rows
        hetcache.disable(model)
        return outputs, captured, rows

    eager, _, _ = run(False)
    replayed, captured, rows = run(True)
    return {"plan": GRAPH_CHECK_PLAN, "steps": len(GRAPH_CHECK_PLAN), "graphs_captured": captured, "rows": rows,
            "max_abs_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(eager, replayed))}


def selection_parts(model, inputs, setting: Setting, timer: Timer) -> dict:
    """Each piece of the FULL-step selection on real-size tensors: partition, k-means, scores, context rows."""
    from hetcache import select, tokens
    from hetcache.session import KMEANS_POINTS, SCORE_QUERIES

    coverage = driving_coverage(setting.grid).to(setting.device)
    parts = {"partition_s": timer(lambda: tokens.partition_tokens(coverage, margin=3), setting.repeats)}
    partition = tokens.partition_tokens(coverage, margin=3)
    dim = setting.config["num_attention_heads"] * setting.config["attention_head_dim"]
    heads, n = setting.config["num_attention_heads"], partition.num_tokens
    generator = torch.Generator(setting.device).manual_seed(3)
    features = torch.randn(partition.context.numel(), dim, generator=generator, device=setting.device)
    queries = torch.randn(heads, partition.generative.numel(), dim // heads, generator=generator,
                          device=setting.device).to(setting.dtype)
    keys = torch.randn(heads, n, dim // heads, generator=generator, device=setting.device).to(setting.dtype)
    parts["kmeans_s"] = timer(lambda: select.kmeans(features, 16, iters=8, max_points=KMEANS_POINTS), setting.repeats)
    parts["scores_s"] = timer(lambda: select.interaction_scores(queries, keys, max_queries=SCORE_QUERIES),
                              setting.repeats)
    labels = select.kmeans(features, 16, iters=8)
    scores = select.interaction_scores(queries, keys)
    count = select.context_count(partition.context.numel(), 0.05)
    parts["context_rows_s"] = timer(
        lambda: select.context_rows(partition.context, count, strategy="kmeans_attention", labels=labels,
                                    scores=scores), setting.repeats)
    return parts


def profile_partial(model, inputs, setting: Setting, fraction: float = 0.15) -> dict:
    """Where a PARTIAL forward at small r spends its time: host (Python, dispatch, launches) vs device."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for compiled in (False, True):
        config = hetcache.HetCacheConfig(plan="F" + "P" * 8, margin=0, margin_ratio=0.0, context_ratio=0.0,
                                         selection="uniform", compile=compiled, cuda_graphs=False)
        hetcache.enable(model, config, token_mask=box_coverage(setting.grid, fraction))
        for _ in range(3):
            forward(model, inputs)
        if setting.device.type == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.device.type == "cuda" else [])
        begin = time.perf_counter()
        with profile(activities=activities) as prof:
            forward(model, inputs)
            if setting.device.type == "cuda":
                torch.cuda.synchronize()
        wall = time.perf_counter() - begin
        hetcache.disable(model)
        events = prof.key_averages()
        device_total = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
        top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:8]
        out["compiled" if compiled else "eager"] = {
            "wall_s_profiled": wall,
            "device_busy_s": device_total,
            "kernel_launches": sum(e.count for e in events if e.key.startswith("cudaLaunchKernel")),
            "top_device_ops": [(e.key[:60], e.count, getattr(e, "self_device_time_total", 0.0) / 1e3) for e in top],
        }
    return out


def denoising_loops(model, inputs, setting: Setting, timer: Timer, compile: bool = False) -> list[dict]:
    """50 steps x 2 CFG branches per plan; speedup over the dense plan next to the analytic FLOPs speedup."""
    uncond = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].flip(1))
    timesteps = torch.linspace(999.0, 10.0, setting.steps)
    rows = []
    runs = [(name, letters, False, False) for name, letters in PLANS.items()]
    variants = [("+graphs", False, True)] + ([("+compile", True, False), ("+compile+graphs", True, True)] if compile else [])
    for suffix, compiled, graphs in variants:  # dense and TeaCache-like have no PARTIAL step: graphs change nothing
        runs += [(name + suffix, letters, compiled, graphs) for name, letters in PLANS.items() if "hetcache" in name]
    for name, letters, compiled, graphs in runs:
        config = hetcache.HetCacheConfig(plan=letters, margin=3, compile=compiled, cuda_graphs=graphs)

        def loop() -> None:
            hetcache.enable(model, config, token_mask=driving_coverage(setting.grid))
            latents = inputs["hidden_states"].clone()
            for t in timesteps.tolist():
                cond = forward(model, dict(inputs, hidden_states=latents), t, "cond")
                negative = forward(model, dict(uncond, hidden_states=latents), t, "uncond")
                latents = latents - 0.02 * (negative + 5.0 * (cond - negative))

        if setting.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timer(loop, 1, warmup=1)
        stats = hetcache.stats(model)
        hetcache.disable(model)
        peak = torch.cuda.max_memory_allocated() if setting.device.type == "cuda" else None
        rows.append({"plan": name, "letters": stats.plan, "seconds": seconds, "flops": stats.flops,
                     "dense_flops": stats.dense_flops, "cache_bytes": stats.cache_bytes, "peak_bytes": peak})
    dense = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = dense / row["seconds"]
        row["flops_speedup"] = row["dense_flops"] / row["flops"]
        row["efficiency"] = row["speedup"] / row["flops_speedup"]
    return rows


def big_block(setting: Setting, timer: Timer) -> dict:
    """One 14B-shaped main block at 480p / 81 frames: FULL and PARTIAL (r = 0.5) times, K/V bytes."""
    spec = setting.big_block
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock

    dim, heads = spec["dim"], spec["heads"]
    with torch.device(setting.device):
        block = WanTransformerBlock(dim, spec["ffn"], heads, "rms_norm_across_heads", True, 1e-6, None)
        rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024)
    block.to(setting.dtype)
    for module in (block.norm1, block.norm2, block.norm3):
        module.float()
    block.scale_shift_table.data = block.scale_shift_table.data.float()
    frames, height, width = spec["grid"]
    n = frames * height * width
    generator = torch.Generator(setting.device).manual_seed(1)
    x = torch.randn(1, n, dim, generator=generator, device=setting.device).to(setting.dtype)
    text = torch.randn(1, spec["text_len"], dim, generator=generator, device=setting.device).to(setting.dtype)
    temb = torch.randn(1, 6, dim, generator=generator, device=setting.device).to(setting.dtype)
    latent = torch.empty(1, 1, frames, height * 2, width * 2, device=setting.device)
    rows_rope = sparse.RowRope.from_rotary_emb(rope(latent))
    text_kv = sparse.text_key_value(block.attn2, text)
    kv = store.LayerKV()
    full_update = store.RowUpdate(None)
    out = {"dim": dim, "heads": heads, "ffn": spec["ffn"], "tokens": n}
    with torch.no_grad():
        out["stock_s"] = timer(lambda: block(x, text, temb, rope(latent)), max(2, setting.repeats // 2))
        out["full_s"] = timer(lambda: sparse.block_rows(block, x, temb, rows_rope, kv, text_kv, full_update),
                              max(2, setting.repeats // 2))
        index = torch.arange(0, n, 2, device=setting.device)
        part = store.RowUpdate(index)
        x_rows, rope_rows = x[:, index], rows_rope.rows(index)
        out["partial_r"] = index.numel() / n
        out["partial_s"] = timer(lambda: sparse.block_rows(block, x_rows, temb, rope_rows, kv, text_kv, part),
                                 max(2, setting.repeats // 2))
    out["kv_bytes_per_layer_per_branch"] = kv.nbytes()
    if setting.device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    parser.add_argument("--out", default=None, help="JSON file for every number")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: forward,compile,profile,loops,big")
    args = parser.parse_args()
    setting = smoke_setting() if args.smoke else real_setting()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_grad_enabled(False)
    # Compiled variants are cached per function, shared by every engine this process builds (about a dozen
    # configurations here, each with FULL / PARTIAL, main / VACE and in-place variants): raise dynamo's limit of 8 so
    # none of them falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    timer = Timer(setting.device)
    report: dict = {
        "setting": {"smoke": args.smoke, "grid": setting.grid, "text_len": setting.text_len, "steps": setting.steps,
                    "dtype": str(setting.dtype), "repeats": setting.repeats},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if setting.device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    model = build_model(setting)
    inputs = make_inputs(setting)
    shape = flops.ModelShape.from_config(model.config)
    n = setting.grid[0] * setting.grid[1] * setting.grid[2]
    report["analytic_tflop_per_forward"] = flops.forward_flops(shape, n, n, setting.text_len, text_kv=True) / 1e12
    compile_too = "compile" not in skip
    if "forward" not in skip:
        report["forward"] = engine_forward_times(model, inputs, setting, timer)
        report["forward_graphs"] = engine_forward_times(model, inputs, setting, timer, graphs=True)
        if compile_too:
            report["forward_compiled"] = engine_forward_times(model, inputs, setting, timer, compile=True)
            report["forward_compiled_graphs"] = engine_forward_times(model, inputs, setting, timer, compile=True,
                                                                     graphs=True)
        report["graph_check"] = graph_check(model, inputs, setting)
    if "profile" not in skip:
        report["profile_partial_r015"] = profile_partial(model, inputs, setting)
    if "loops" not in skip:
        report["loops"] = denoising_loops(model, inputs, setting, timer, compile=compile_too)
    if "big" not in skip:
        del model
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        report["big_block"] = big_block(setting, timer)
    report["targets"] = check_targets(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    print_targets(report["targets"])


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  torch {report['versions']['torch']}  diffusers {report['versions']['diffusers']}")
    for key in ("forward", "forward_graphs", "forward_compiled", "forward_compiled_graphs"):
        print_forward(report.get(key))
    check = report.get("graph_check")
    if check:
        print(f"CUDA graphs vs eager, plan {check['plan']}, both CFG branches, EMA: {check['graphs_captured']} "
              f"graph(s) captured, max abs diff {check['max_abs_diff']:.1e} (rows per step {check['rows']})")
    parts = (report.get("forward") or {}).get("selection_parts")
    if parts:
        print("selection pieces (ms): " + ", ".join(f"{k[:-2]} {1e3 * v:.2f}" for k, v in parts.items()))
    print_rest(report)


def print_forward(forward_times: dict | None) -> None:
    if forward_times:
        label = ("compiled engine" if forward_times["compile"] else "eager engine") + (
            " + CUDA graphs" if forward_times.get("cuda_graphs") else "")
        print(f"--- {label}")
        full = forward_times["engine_full_s"]
        print(f"per forward (one branch, {forward_times['tokens']} tokens): stock {1e3 * forward_times['stock_s']:.1f} ms, "
              f"engine FULL {1e3 * full:.1f} ms ({full / forward_times['stock_s']:.3f} x stock, rel err "
              f"{forward_times['engine_full_rel_err']:.1e}), REUSE {1e3 * forward_times['reuse_s']:.2f} ms "
              f"({forward_times['reuse_s'] / full:.4f} x FULL)")
        if "selection_overhead" in forward_times:
            overhead = forward_times["full_with_selection_s"] - forward_times["full_uniform_selection_s"]
            print(f"selection overhead: {1e3 * overhead:.1f} ms = {100 * overhead / full:.1f} % of a FULL forward, "
                  f"{50 * overhead / full:.1f} % of a FULL CFG step (selection is shared by both branches)")
        print(f"{'PARTIAL':<44}{'r':>7}{'ms':>9}{'x FULL':>8}{'target':>8}{'graphs':>8}")
        for row in forward_times["partial"]:
            target = 1.1 * row["r"] * full + 2e-3
            print(f"{row['mask']:<44}{row['r']:7.3f}{1e3 * row['seconds']:9.1f}{row['seconds'] / full:8.3f}"
                  f"{target / full:8.3f}{'yes' if row.get('graphs_active') else 'no':>8}")


# Engine modes: report key -> (suffix of the mode's loop names, label).
MODES = {"forward": ("", "eager"), "forward_graphs": ("+graphs", "eager + CUDA graphs"),
         "forward_compiled": ("+compile", "compiled"), "forward_compiled_graphs": ("+compile+graphs", "compiled + graphs")}


def check_targets(report: dict) -> dict:
    """Issue 5's targets per engine mode, each with the measured value and its limit (medians of this run).

    Loops of a mode: its HetCache plans (and, for the plain eager mode, the dense and TeaCache-like plans),
    against the eager dense loop.
    """
    verdicts = {}
    for key, (suffix, _) in MODES.items():
        times = report.get(key)
        if not times:
            continue
        full = times["engine_full_s"]
        checks = [("FULL / stock", full / times["stock_s"], 1.02)]
        for row in times["partial"]:
            if row["r"] >= 0.15:
                checks.append((f"PARTIAL {row['mask'].split(' (')[0]} r={row['r']:.3f} / FULL", row["seconds"] / full,
                               (1.1 * row["r"] * full + 2e-3) / full))
        checks.append(("REUSE / FULL", times["reuse_s"] / full, 0.01))
        if "selection_overhead" in times:
            overhead = (times["full_with_selection_s"] - times["full_uniform_selection_s"]) / full
            checks.append(("selection / FULL forward", overhead, 0.03))
        for row in report.get("loops", []):
            name = row["plan"]
            if (suffix and name.endswith(suffix) and name[: -len(suffix)] in PLANS) or (not suffix and name in PLANS):
                checks.append((f"loop {name}: speedup / FLOPs speedup", row["efficiency"], 0.9))
        rows = [{"target": what, "measured": value, "limit": limit,
                 "met": value >= limit if what.startswith("loop") else value <= limit} for what, value, limit in checks]
        verdicts[key] = {"all_met": all(row["met"] for row in rows), "checks": rows}
    return verdicts


def print_targets(verdicts: dict) -> None:
    print("targets of issue 5 (same run):")
    for key, verdict in verdicts.items():
        missed = [f"{row['target']} {row['measured']:.3f} (limit {row['limit']:.3f})" for row in verdict["checks"]
                  if not row["met"]]
        print(f"  {MODES[key][1]:<20} {'all met' if verdict['all_met'] else 'missed: ' + '; '.join(missed)} "
              f"({len(verdict['checks'])} checks)")


def print_rest(report: dict) -> None:
    for row in report.get("loops", []):
        print(f"loop {row['plan']:<14} {row['letters']}  {row['seconds']:7.2f} s  speedup {row['speedup']:5.2f}  "
              f"FLOPs speedup {row['flops_speedup']:5.2f}  efficiency {row['efficiency']:.3f}  "
              f"cache {row['cache_bytes'] / 2**30:.2f} GiB  peak {(row['peak_bytes'] or 0) / 2**30:.1f} GiB")
    for mode, prof in (report.get("profile_partial_r015") or {}).items():
        print(f"profile PARTIAL r=0.15 {mode}: wall {1e3 * prof['wall_s_profiled']:.1f} ms, device busy "
              f"{1e3 * prof['device_busy_s']:.1f} ms, {prof['kernel_launches']} kernel launches; top: "
              + "; ".join(f"{name} x{count} {ms:.1f} ms" for name, count, ms in prof["top_device_ops"][:4]))
    big = report.get("big_block")
    if big:
        print(f"14B-shaped block, {big['tokens']} tokens: stock {1e3 * big['stock_s']:.1f} ms, engine FULL "
              f"{1e3 * big['full_s']:.1f} ms, PARTIAL r={big['partial_r']:.2f} {1e3 * big['partial_s']:.1f} ms, "
              f"K/V {big['kv_bytes_per_layer_per_branch'] / 2**20:.0f} MiB per layer and branch")


if __name__ == "__main__":
    main()
