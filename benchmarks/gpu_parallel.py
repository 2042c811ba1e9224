"""Several GPUs (issue 20 item 4, run by issue 21): Ulysses context parallelism of the Wan2.1-VACE transformer at
the 1.3B and 14B shapes, stock and hetcache-fast, on 1 to N GPUs.

Random bf16 weights (times do not depend on them), 81 frames of 480x832 (21 x 30 x 52 = 32,760 tokens; --sizes
720p: 21 x 45 x 80 = 75,600), 512 text tokens, CFG (two transformer calls per step), the driving clip's mask
(benchmarks/data, stretched to 81 frames). For each shape, size and degree d (1, and each divisor of N that
divides the model's heads):

- stock: one warm-up step, then --stock-steps timed steps; the 50-step loop estimated as 50 x the median step.
- hetcache-fast's budget (`method_config("hetcache-fast", steps=50)`) planned over all 50 steps with REUSE
  allowed, so that F, P and R steps all run and are timed (the preset itself plans F and P over the S' solver
  steps it chooses: its letters and time estimated from the measured kinds are in `preset_plan` and
  `preset_estimated_s`); a warm-up video of the plan's first M steps (the shortest prefix with two steps of each kind the plan
  has), then the same M steps timed on a new video: median seconds of a step of each kind (F, P, R), and the
  50-step loop estimated from the plan's letters.
- per rank: peak GPU memory, HetCache cache bytes (text K/V among them), bytes received per call of each kind.
- communication time: each kind's last call's collectives (`hetcache.comm.CommLedger.last`) replayed alone on the
  same group and timed; their share of the call (half a step: cond and uncond).
- agreement: the cond output of every timed step against degree 1's: max abs difference, and that over the
  largest abs output (the stated tolerance, docs/PARALLEL.md: 1e-2 in bf16).

Degree 1 runs on rank 0 alone (the others wait); degree d < N runs N / d groups side by side, one per d GPUs (a
("batch", "ring", "ulysses") device mesh), and reports the group of rank 0. The JSON is rewritten after every
degree; parts already in --out are kept, so shapes and degrees can run in separate launches (--shapes, --sizes,
--degrees): degree 1's outputs are saved beside --out (OUT.reference.pt) for the later launches to compare with.

    torchrun --nproc-per-node 4 benchmarks/gpu_parallel.py --out parallel.json        # 4 GPUs
    torchrun --nproc-per-node 2 benchmarks/gpu_parallel.py --smoke --out smoke.json   # tiny shapes, CPU (gloo)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_memory import WAN_14B, build, inputs_for, sync, video  # noqa: E402
from gpu_transformer import TINY, WAN_1_3B, driving_coverage  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import hetcache  # noqa: E402
from hetcache import parallel, tokens  # noqa: E402
from hetcache import plan as planning  # noqa: E402
from hetcache.comm import Collective  # noqa: E402
from hetcache.errors import UserError  # noqa: E402
from hetcache.hooks import engine_of  # noqa: E402
from hetcache.methods import method_config  # noqa: E402
from hetcache.pipeline import default_flow_shift, flow_scheduler, preview_timesteps  # noqa: E402

STEPS = 50
SHAPES = {"1.3b": WAN_1_3B, "14b": WAN_14B}
SMOKE_SHAPE = dict(TINY, num_attention_heads=4, attention_head_dim=8)  # 4 heads of the tiny width: up to 4 ranks
SMOKE_SHAPES = {"1.3b": SMOKE_SHAPE, "14b": dict(SMOKE_SHAPE, num_layers=5, vace_layers=[0])}
SIZES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
SMOKE_SIZE = (9, 128, 192)  # 3 x 8 x 12 = 288 tokens
AGREEMENT = 1e-2  # largest max |d GPUs - 1 GPU| / max |1 GPU| accepted (bf16; float32 on the CPU: 1e-5)
SMOKE_AGREEMENT = 1e-5
GIB = 2**30


# --------------------------------------------------------------------------------------------- processes
class Processes:
    """This process's place in the launch (torchrun), or a process alone."""

    def __init__(self, device_type: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            # long: degree 1 runs on rank 0 while the others wait (a CPU tensor: gloo)
            info = parallel.init_process_group(device_type, timeout=timedelta(minutes=60))
            self.rank, self.device = info.rank, info.device
        else:
            self.rank, self.device = 0, torch.device(device_type)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        """Every rank here (a CPU all-reduce, gloo's timeout: the NCCL watchdog is not involved)."""
        if self.world > 1:
            dist.all_reduce(torch.zeros(1))

    def gather(self, values: list[int], active: bool) -> list[list[int]]:
        """Every rank's `values` in rank order (`active`: all ranks take part; else this rank's alone)."""
        if not active or self.world == 1:
            return [values]
        mine = torch.tensor(values, dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return [part.tolist() for part in parts]


def degrees_for(heads: int, world: int, asked: list[int] | None) -> list[int]:
    """1 and every divisor of the process count that divides the heads (or those of `asked` that can run)."""
    possible = [d for d in range(1, world + 1) if world % d == 0 and heads % d == 0]
    return possible if asked is None else [d for d in asked if d in possible]


def split(model: torch.nn.Module, degree: int, processes: Processes) -> parallel.UlyssesGroup | None:
    """Context parallelism over `degree` ranks: all of them, or N / degree groups side by side."""
    if degree == 1:
        return None
    mesh = None
    if degree < processes.world:
        mesh = init_device_mesh(processes.device.type, (processes.world // degree, 1, degree),
                                mesh_dim_names=("batch", "ring", "ulysses"))
    parallel.enable_context_parallel(model, mesh=mesh)
    return parallel.ulysses_group(model)


def same_weights(model: torch.nn.Module, processes: Processes) -> bool:
    """Whether every rank built the same weights (seeded on each device): the outputs would be wrong otherwise."""
    total = sum(float(p.detach().float().sum()) for p in model.parameters())
    values = processes.gather([int(total * 1e3)], active=True)
    return all(value == values[0] for value in values)


# -------------------------------------------------------------------------------------------------- runs
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1


def prefix_length(letters: str) -> int:
    """The shortest prefix of the plan with two steps of each kind the plan has (all of it if it has fewer)."""
    need = {kind: min(2, letters.count(kind)) for kind in set(letters)}
    for end in range(1, len(letters) + 1):
        if all(letters[:end].count(kind) >= count for kind, count in need.items()):
            return end
    return len(letters)


def by_kind(letters: str, seconds: list[float]) -> dict[str, float]:
    """Median seconds of a step of each kind."""
    return {kind: statistics.median(s for letter, s in zip(letters, seconds) if letter == kind)
            for kind in "FPR" if kind in letters}


def stock_run(model, inputs, timesteps, steps, device, group, outputs: list) -> dict:
    video(model, inputs, timesteps[:1], device)  # warm-up: kernels, NCCL communicators
    if group is not None:
        group.ledger.reset()
    reset_peak(device)
    seconds = video(model, inputs, timesteps[:steps], device, outputs)
    step = statistics.median(seconds)
    out = {"step_seconds": seconds, "seconds_by_kind": {"F": step}, "estimated_50_step_s": STEPS * step,
           "peak_bytes": peak(device)}
    return out | communication(group, out["seconds_by_kind"], device)


def preset_letters(model, config, coverage, text_len: int, timesteps_for) -> str:
    """The letters a pipeline asked for STEPS steps would run: S' and the plan solved with this run's scheduler (a
    transformer enabled with fixed timesteps plans over exactly those, so the solve happens here)."""
    hetcache.enable(model, config, token_mask=coverage)
    partition = engine_of(model).mask.early_partition(config, tuple(model.config.patch_size))
    hetcache.disable(model)

    def schedule(steps: int) -> torch.Tensor:
        return torch.tensor(timesteps_for(steps))

    steps = planning.solver_steps(model, config, STEPS, partition=partition, text_len=text_len, timesteps_for=schedule)
    letters, _, _ = planning.resolve_plan(model, config, partition, text_len, timesteps=schedule(steps), num_steps=steps,
                                          requested_steps=STEPS)
    return letters


def hetcache_run(model, inputs, timesteps_for, coverage, device, group, outputs: list) -> dict:
    """Per-kind step times of an F/P/R plan at the preset's budget over all STEPS steps, and the preset's own plan
    (F/P over the S' solver steps it chooses) estimated from them."""
    preset = method_config("hetcache-fast", steps=STEPS)
    preset_plan = preset_letters(model, preset, coverage, inputs["encoder_hidden_states"].shape[1], timesteps_for)
    # Timed: the preset's budget over every requested step with REUSE allowed, so that F, P and R all run.
    config = dataclasses.replace(preset, max_reuse=3, max_step_fraction=None, step_fraction=1.0)
    timesteps = timesteps_for(STEPS)
    hetcache.enable(model, config, token_mask=coverage, timesteps=torch.tensor(timesteps))
    letters = hetcache.plan_for(model, STEPS)
    measured = prefix_length(letters)
    video(model, inputs, timesteps[:measured], device)  # warm-up video: allocations, graphs, host pinning
    hetcache.reset(model)
    if group is not None:
        group.ledger.reset()
    reset_peak(device)
    seconds = video(model, inputs, timesteps[:measured], device, outputs)
    stats = hetcache.stats(model)
    text_kv = group.ledger.text_kv_bytes if group is not None else text_kv_bytes(model)
    graphs = len(engine_of(model).graphs or ())
    hetcache.disable(model)
    kinds = by_kind(letters[:measured], seconds)
    out = {"plan": letters, "measured_steps": measured, "executed": stats.plan, "step_seconds": seconds,
           "seconds_by_kind": kinds, "estimated_50_step_s": sum(kinds[letter] for letter in letters),
           "preset_plan": preset_plan, "preset_estimated_s": sum(kinds[letter] for letter in preset_plan),
           "flops_ratio": stats.flops_ratio, "rows": stats.rows, "cache_bytes": stats.cache_bytes,
           "text_kv_bytes": text_kv, "notes": stats.notes, "graphs_captured": graphs, "peak_bytes": peak(device)}
    return out | communication(group, kinds, device)


def text_kv_bytes(model) -> int:
    """The text K/V bytes of one process's HetCache caches (every branch)."""
    engine = engine_of(model)
    return sum(state.cache.text_nbytes() for state in engine.branches.values())


def communication(group: parallel.UlyssesGroup | None, step_seconds: dict[str, float],
                  device: torch.device) -> dict:
    """Bytes received per call of each kind, and the time of one call's collectives replayed alone and its share
    of the call (half the median step)."""
    if group is None:
        return {"received_per_call": {}, "comm_seconds_per_call": {}, "comm_share": {}}
    ledger = group.ledger
    last = {kind: list(ledger.last.get(kind, [])) for kind in "FPR" if kind in step_seconds}
    seconds = {kind: replay(collectives, group, device) for kind, collectives in last.items()}
    return {"received_per_call": ledger.per_call(), "comm_seconds_per_call": seconds,
            "comm_share": {kind: value / (step_seconds[kind] / 2) for kind, value in seconds.items()}}


def replay(collectives: list[Collective], group: parallel.UlyssesGroup, device: torch.device,
           repeats: int = 5) -> float:
    """Median seconds of `collectives` run alone, in order, on `group` (every rank took part in the same ones;
    an uneven all-to-all is replayed as an even one of the largest rank's size)."""
    sizes = torch.tensor([c.numel for c in collectives] or [0], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group.group)
    ops = []
    for collective, numel in zip(collectives, sizes.tolist()):
        ops.append(_collective(collective.op, numel, collective.dtype, group, device))
    for op in ops:  # warm-up
        op()
    times = []
    for _ in range(repeats):
        sync(device)
        begin = time.perf_counter()
        for op in ops:
            op()
        sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _collective(op: str, numel: int, dtype: torch.dtype, group: parallel.UlyssesGroup,
                device: torch.device) -> Callable[[], None]:
    degree, handle, root = group.degree, group.group, group.global_rank(0)
    if op == "all_to_all":
        numel = -(-numel // degree) * degree
    data = torch.zeros(numel, dtype=dtype, device=device)
    if op == "all_to_all":
        received = torch.empty_like(data)
        return lambda: dist.all_to_all_single(received, data, group=handle)
    if op == "all_gather":
        parts = [torch.empty_like(data) for _ in range(degree)]
        return lambda: dist.all_gather(parts, data, group=handle)
    if op == "gather":
        parts = [torch.empty_like(data) for _ in range(degree)] if group.rank == 0 else None
        return lambda: dist.gather(data, parts, dst=root, group=handle)
    if op == "broadcast":
        return lambda: dist.broadcast(data, src=root, group=handle)
    raise ValueError(f"unknown collective {op}")


def run_degree(shape: dict, size: tuple[int, int, int], degree: int, processes: Processes, dtype: torch.dtype,
               stock_steps: int, reference: dict | None) -> dict | None:
    """Stock, then hetcache-fast, on `degree` ranks; rank 0's report (None elsewhere)."""
    device = processes.device
    active = degree > 1  # every rank takes part (degree 1: rank 0 alone)
    if not active and not processes.main:
        return None
    model = build(shape, device, dtype)
    grid = tokens.latent_grid(size, tuple(shape["patch_size"]))
    inputs = inputs_for(model.config, grid, device, dtype)
    coverage = driving_coverage(grid)
    scheduler = flow_scheduler(default_flow_shift(*size[1:]))
    timesteps = preview_timesteps(scheduler, STEPS).tolist()
    out: dict = {"degree": degree, "device": device_name(device), "processes": processes.world}
    if active and not same_weights(model, processes):
        raise RuntimeError("the ranks built different weights: the comparison would mean nothing")
    group = split(model, degree, processes)
    outputs: dict[str, list[torch.Tensor]] = {"stock": [], "hetcache": []}
    runs = {"stock": lambda: stock_run(model, inputs, timesteps, stock_steps, device, group, outputs["stock"]),
            "hetcache": lambda: hetcache_run(model, inputs, lambda n: preview_timesteps(scheduler, n).tolist(), coverage,
                                              device, group, outputs["hetcache"])}
    for name, run in runs.items():
        try:
            result = run()
        except (UserError, torch.OutOfMemoryError) as error:  # one process alone: nothing waits on it
            if active:
                raise
            hetcache.disable(model)
            out[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        per_rank = processes.gather([result.pop("peak_bytes"), result.get("cache_bytes", 0)], active)[:degree]
        result["peak_bytes_per_rank"] = [None if p < 0 else p for p, _ in per_rank]
        if name == "hetcache":
            result["cache_bytes_per_rank"] = [c for _, c in per_rank]
        out[name] = result
    if processes.main:
        out["agreement"] = {name: agreement(outputs[name], (reference or {}).get(name)) for name in outputs}
        out["outputs"] = outputs  # taken out by the caller
    return out


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor] | None) -> dict | None:
    """Max abs difference of `outputs` from degree 1's, over the steps both have, and over the largest abs value."""
    if not reference or not outputs:
        return None
    pairs = list(zip(outputs, reference))
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
    scale = max(float(b.float().abs().max()) for _, b in pairs)
    return {"max_abs_diff": diff, "max_abs": scale, "relative": diff / scale if scale else 0.0, "steps": len(pairs)}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------ report
def targets(report: dict) -> list[dict]:
    """Issue 21's targets for every shape and degree measured: stock scaling (14B), HetCache's speedup kept,
    cache bytes per rank, agreement with one GPU."""
    limit = report["agreement_tolerance"]
    rows = []
    for key, run in report["runs"].items():
        degrees = run["degrees"]
        one = degrees.get("1", {})
        for degree, entry in sorted(degrees.items(), key=lambda item: int(item[0])):
            d = int(degree)
            if d == 1 or entry.get("device") != one.get("device"):  # compared on the same kind of GPU only
                continue
            stock1, stock = one.get("stock", {}), entry.get("stock", {})
            het1, het = one.get("hetcache", {}), entry.get("hetcache", {})
            if "estimated_50_step_s" in stock1 and "estimated_50_step_s" in stock and key.startswith("14b"):
                rows.append({"target": f"{key} stock on {d} GPUs: speedup over 1 GPU / {d}",
                             "measured": stock1["estimated_50_step_s"] / stock["estimated_50_step_s"] / d,
                             "limit": 0.8, "at_least": True})
            times = [r.get("estimated_50_step_s") for r in (stock1, het1, stock, het)]
            if all(times):
                rows.append({"target": f"{key} HetCache speedup over stock on {d} GPUs / on 1 GPU",
                             "measured": (times[2] / times[3]) / (times[0] / times[1]), "limit": 0.9,
                             "at_least": True})
            if het1.get("cache_bytes") and het.get("cache_bytes_per_rank"):
                text = het["text_kv_bytes"]
                whole = max((c - text) * d + text for c in het["cache_bytes_per_rank"])
                rows.append({"target": f"{key} per-rank cache x {d} (text K/V once) / 1 GPU's, minus 1",
                             "measured": abs(whole / het1["cache_bytes"] - 1), "limit": 0.0})
            for name in ("stock", "hetcache"):
                check = (entry.get("agreement") or {}).get(name)
                if check:
                    rows.append({"target": f"{key} {name} on {d} GPUs: max abs diff / max abs output vs 1 GPU",
                                 "measured": check["relative"], "limit": limit})
    for row in rows:
        row["met"] = row["measured"] >= row["limit"] if row.pop("at_least", False) else row["measured"] <= row["limit"]
    return rows


def load(path: Path | None) -> dict:
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def save(path: Path | None, report: dict) -> None:
    if path is not None:
        temporary = path.with_name(path.name + ".partial")
        temporary.write_text(json.dumps(report, indent=2))
        temporary.replace(path)


def reference_file(path: Path | None) -> Path | None:
    return None if path is None else path.with_name(path.stem + ".reference.pt")


def print_table(report: dict) -> None:
    print(f"{'shape':<12} {'GPUs':>4}  {'stock s/step':>12}  {'F / P / R s/step':>22}  {'50 steps stock':>14}  "
          f"{'hetcache':>8}  {'x':>5}  {'comm share F/P/R':>17}  {'peak GiB':>8}  {'cache GiB':>9}  agree")
    for key, run in report["runs"].items():
        for degree, entry in sorted(run["degrees"].items(), key=lambda item: int(item[0])):
            stock, het = entry.get("stock", {}), entry.get("hetcache", {})
            if "error" in stock or "error" in het:
                print(f"{key:<12} {degree:>4}  {stock.get('error') or het.get('error')}")
                continue
            kinds = " / ".join(f"{het['seconds_by_kind'].get(k, 0):.2f}" for k in "FPR")
            share = " / ".join(f"{het['comm_share'].get(k, 0):.2f}" for k in "FPR")
            peaks = [p for p in het["peak_bytes_per_rank"] if p is not None]
            agree = (entry.get("agreement") or {}).get("hetcache")
            print(f"{key:<12} {degree:>4}  {stock['seconds_by_kind']['F']:12.3f}  {kinds:>22}  "
                  f"{stock['estimated_50_step_s']:14.1f}  {het['estimated_50_step_s']:8.1f}  "
                  f"{stock['estimated_50_step_s'] / het['estimated_50_step_s']:5.2f}  {share:>17}  "
                  f"{max(peaks) / GIB if peaks else float('nan'):8.2f}  {max(het['cache_bytes_per_rank']) / GIB:9.3f}  "
                  f"{'-' if agree is None else format(agree['relative'], '.1e')}")
    for row in report["targets"]:
        print(f"{'MET ' if row['met'] else 'MISS'} {row['target']}: {row['measured']:.3f} (limit {row['limit']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU processes (gloo)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for every number (parts in it are kept)")
    parser.add_argument("--shapes", default="1.3b,14b", help="comma list of 1.3b, 14b")
    parser.add_argument("--sizes", default="480p", help="comma list of 480p, 720p (81 frames)")
    parser.add_argument("--degrees", default=None, help="comma list of GPU counts (default: every one that can run)")
    parser.add_argument("--stock-steps", type=int, default=3, help="timed steps of the stock loop")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    # diffusers 0.42.1's output gather calls a torch function that warns of its own deprecation on every run
    warnings.filterwarnings("ignore", message=".*all_gather_tensor` is deprecated", category=FutureWarning)
    processes = Processes("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    asked = None if args.degrees is None else [int(d) for d in args.degrees.split(",")]
    report = load(args.out) if processes.main else {"runs": {}}
    report.update({"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": STEPS,
                   "agreement_tolerance": SMOKE_AGREEMENT if args.smoke else AGREEMENT})
    references_path = reference_file(args.out)
    references = {}
    if processes.main and references_path is not None and references_path.is_file():
        references = torch.load(references_path, weights_only=True)
    for shape_name in filter(None, args.shapes.split(",")):
        shape = (SMOKE_SHAPES if args.smoke else SHAPES)[shape_name]
        for size_name in filter(None, args.sizes.split(",")):
            size = SMOKE_SIZE if args.smoke else SIZES[size_name]
            key = f"{shape_name}@{size_name}"
            run = report["runs"].setdefault(key, {"degrees": {}})
            grid = tokens.latent_grid(size, tuple(shape["patch_size"]))
            run.update({"frames_height_width": list(size), "grid": list(grid), "tokens": math.prod(grid),
                        "layers": shape["num_layers"], "vace_layers": len(shape["vace_layers"]),
                        "heads": shape["num_attention_heads"],
                        "dim": shape["num_attention_heads"] * shape["attention_head_dim"]})
            for degree in degrees_for(shape["num_attention_heads"], processes.world, asked):
                reference = references.get(key) if degree > 1 else None
                entry = run_degree(shape, size, degree, processes, dtype, args.stock_steps, reference)
                gc.collect()  # the model of that degree
                if processes.device.type == "cuda":
                    torch.cuda.empty_cache()
                if processes.main:
                    outputs = entry.pop("outputs")
                    if degree == 1:
                        references[key] = outputs
                        if references_path is not None:
                            torch.save(references, references_path)
                    run["degrees"][str(degree)] = entry
                    report["targets"] = targets(report)
                    save(args.out, report)
                processes.wait()
    if processes.main:
        report["targets"] = targets(report)
        save(args.out, report)
        print_table(report)
    if processes.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
