"""Cache memory at real sizes on one GPU (issue 18): the host tier against the cache on the GPU.

Random bf16 weights (times and bytes do not depend on them), 480x832, 81 frames (21 x 30 x 52 = 32,760 tokens),
512 text tokens, CFG (two transformer calls per step), a centred box covering a quarter of every frame:

- 1.3B shape, 50 steps: the stock loop, then hetcache-fast (budget 0.33) with the cache on the GPU (uncapped),
  then with `cache_device="auto"` under a 24 GiB cap (`torch.cuda.set_per_process_memory_fraction`), and the
  same with half of the layers on the host (`host_share=0.5`). Peak memory and denoising time of each.
- 14B shape (40 blocks, VACE blocks at 0, 5, ..., 35, dim 5120, 40 heads), plan FFPRPF: each call's time with the
  cache on the GPU (uncapped) and with `cache_device="auto"` under an 80 GiB cap.
- float8 K/V: a FULL step and a REUSE step on identical inputs equal those of the bf16 cache bit for bit.

Each HetCache run is a second video on its engine (the first, a 3-step plan, pays for pinning host memory).

    python benchmarks/gpu_memory.py --out memory.json      # on the GPU (about 6 minutes on an H200)
    python benchmarks/gpu_memory.py --smoke                # tiny shapes on the CPU (checks that it runs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_transformer import TINY, WAN_1_3B, box_coverage  # noqa: E402

import hetcache  # noqa: E402
from hetcache import compat  # noqa: E402
from hetcache.pipeline import flow_scheduler, preview_timesteps  # noqa: E402

WAN_14B = dict(WAN_1_3B, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
               vace_layers=list(range(0, 40, 5)))
GIB = 2**30


def build(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanVACETransformer3DModel(**config)
    keep = set(compat.keep_in_fp32_modules(model))  # what from_pretrained(torch_dtype=bf16) keeps in float32
    for name, module in model.named_modules():
        module.to(torch.float32 if keep.intersection(name.split(".")) else dtype)
    return model.eval()


def inputs_for(config: dict, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device).manual_seed(0)
    frames, height, width = grid[0], grid[1] * 2, grid[2] * 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    return {"hidden_states": randn(1, 16, frames, height, width),
            "control_hidden_states": randn(1, 96, frames, height, width),
            "encoder_hidden_states": randn(1, 512 if device.type == "cuda" else 8, config["text_dim"])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def video(model, inputs: dict, timesteps: list[float], device: torch.device,
          keep: list[torch.Tensor] | None = None) -> list[float]:
    """One denoising loop with CFG; the seconds of each step (both branches); the cond outputs appended to `keep`
    (copied to the CPU after the step's time is taken)."""
    uncond = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].flip(1))
    latents = inputs["hidden_states"].clone()
    seconds = []
    for t in timesteps:
        sync(device)
        begin = time.perf_counter()
        step = torch.tensor([t], device=device)
        with model.cache_context("cond"):
            cond = model(timestep=step, return_dict=False, **dict(inputs, hidden_states=latents))[0]
        with model.cache_context("uncond"):
            negative = model(timestep=step, return_dict=False, **dict(uncond, hidden_states=latents))[0]
        latents = latents - 0.02 * (negative + 5.0 * (cond - negative))
        sync(device)
        seconds.append(time.perf_counter() - begin)
        if keep is not None:
            keep.append(cond.cpu())
    return seconds


def cap(device: torch.device, gib: float | None) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total))
        torch.cuda.empty_cache()


def measured(model, config, coverage, inputs, timesteps, device) -> dict:
    """A warm-up video (the plan's first 3 steps: it pays for pinning host memory and loading kernels), then the
    timed one on the same engine: time, per-step times, peak, plan, notes."""
    hetcache.enable(model, config, token_mask=coverage, timesteps=torch.tensor(timesteps))
    video(model, inputs, timesteps[:3], device)
    hetcache.reset(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = video(model, inputs, timesteps, device)
    stats = hetcache.stats(model)
    hetcache.disable(model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": sum(seconds), "step_seconds": seconds, "peak_bytes": peak, "plan": stats.plan,
            "cache_bytes": stats.cache_bytes, "notes": stats.notes}


def stock(model, inputs, timesteps, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = video(model, inputs, timesteps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": sum(seconds), "step_seconds": seconds, "peak_bytes": peak}


def part_1_3b(device, dtype, grid, steps: int, keep=lambda out: None) -> dict:
    model = build(WAN_1_3B if device.type == "cuda" else TINY, device, dtype)
    inputs = inputs_for(model.config, grid, device, dtype)
    coverage = box_coverage(grid, 0.25)
    timesteps = preview_timesteps(flow_scheduler(3.0), steps).tolist()
    out = {"stock": stock(model, inputs, timesteps, device)}
    runs = {"gpu_tier": (None, dict(cache_device="cuda")), "auto_capped_24gib": (24, {}),
            "half_on_host_capped_24gib": (24, dict(cache_device="cpu", host_share=0.5)),
            "all_on_host_capped_24gib": (24, dict(cache_device="cpu"))}
    for name, (gib, options) in runs.items():
        cap(device, gib)
        # The fast budget over all 50 steps in the F/P/R family (the run of 2026-12-05 in docs/BENCHMARKS.md): a
        # transformer enabled with fixed timesteps plans over exactly those, so the presets' solver-step choice
        # does not apply here.
        config = hetcache.HetCacheConfig.fast(max_reuse=3, max_step_fraction=None, **options)
        out[name] = measured(model, config, coverage, inputs, timesteps, device)
        keep(out)
    cap(device, None)
    out["float8"] = float8_check(model, inputs, coverage, device)
    return out


def float8_check(model, inputs, coverage, device) -> dict:
    """FULL then REUSE of the same inputs with bf16 and float8 K/V: both outputs must be equal bit for bit."""
    outputs = {}
    for name, dtype in (("bf16", None), ("float8", torch.float8_e4m3fn)):
        hetcache.enable(model, hetcache.HetCacheConfig(plan="FRP", cache_dtype=dtype), token_mask=coverage)
        step = torch.tensor([500.0], device=device)
        with model.cache_context("cond"):
            outputs[name] = [model(timestep=step, return_dict=False, **inputs)[0] for _ in range(2)]
        hetcache.disable(model)
    return {"full_equal": bool(torch.equal(outputs["bf16"][0], outputs["float8"][0])),
            "reuse_equal": bool(torch.equal(outputs["bf16"][1], outputs["float8"][1]))}


def part_14b(device, dtype, grid, cache_dtype: torch.dtype | None = None) -> dict:
    """The host tier under an 80 GiB cap against the cache on the GPU. A bf16 cache on the GPU needs more than
    80 GiB (weights 34 GB + cache 64 GB): on a smaller card `cache_dtype=float8` halves the cache for both runs, and
    the second run puts it on the host explicitly (auto would keep a cache that fits on the GPU)."""
    model = build(WAN_14B if device.type == "cuda" else dict(TINY, num_layers=5, vace_layers=[0]), device, dtype)
    inputs = inputs_for(model.config, grid, device, dtype)
    coverage = box_coverage(grid, 0.25)
    timesteps = preview_timesteps(flow_scheduler(3.0), 6).tolist()
    out = {"cache_dtype": "bf16" if cache_dtype is None else str(cache_dtype).removeprefix("torch.")}
    host = ("auto_capped_80gib", 80, "auto") if cache_dtype is None else ("host_capped_80gib", 80, "cpu")
    for name, gib, cache_device in (("gpu_tier", None, "cuda"), host):
        cap(device, gib)
        config = hetcache.HetCacheConfig(plan="FFPRPF", cache_device=cache_device, cache_dtype=cache_dtype)
        out[name] = measured(model, config, coverage, inputs, timesteps, device)
    cap(device, None)
    return out


def save(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    parser.add_argument("--out", default=None, help="JSON file for every number")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: 1.3b,14b")
    parser.add_argument("--cache-dtype-14b", choices=("bf16", "float8"), default="bf16",
                        help="the 14B part's cache dtype (float8 where a bf16 cache does not fit beside the weights)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    grid = (3, 6, 8) if args.smoke else (21, 30, 52)
    skip = set(filter(None, args.skip.split(",")))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "grid": grid,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if "1.3b" not in skip:
        report["wan_1_3b"] = part_1_3b(device, dtype, grid, 6 if args.smoke else 50,
                                       keep=lambda out: save(args.out, {**report, "wan_1_3b": out}))
        save(args.out, report)  # what a later part's failure would otherwise lose
    if "14b" not in skip:
        report["wan_14b"] = part_14b(device, dtype, grid,
                                     torch.float8_e4m3fn if args.cache_dtype_14b == "float8" else None)
    report["targets"] = targets(report)
    save(args.out, report)
    print_table(report)


def targets(report: dict) -> list[dict]:
    rows = []
    small = report.get("wan_1_3b")
    if small:
        auto, gpu, base = small["auto_capped_24gib"], small["gpu_tier"], small["stock"]
        if base["peak_bytes"]:
            rows.append({"target": "1.3B auto (24 GiB cap) peak / stock peak", "measured": auto["peak_bytes"] /
                         base["peak_bytes"], "limit": 1.15})
        rows.append({"target": "1.3B auto (24 GiB cap) time / GPU tier time", "measured": auto["seconds"] / gpu["seconds"],
                     "limit": 1.10})
        rows.append({"target": "float8 FULL and REUSE equal bf16 bitwise", "measured": float(
            small["float8"]["full_equal"] and small["float8"]["reuse_equal"]), "limit": 1.0, "at_least": True})
    big = report.get("wan_14b")
    if big:
        plan = big["gpu_tier"]["plan"]
        partial = [i for i, letter in enumerate(plan) if letter == "P"]
        tier = "auto_capped_80gib" if "auto_capped_80gib" in big else "host_capped_80gib"
        host = sum(big[tier]["step_seconds"][i] for i in partial)
        device = sum(big["gpu_tier"]["step_seconds"][i] for i in partial)
        rows.append({"target": f"14B PARTIAL step ({big['cache_dtype']} cache), host / GPU tier",
                     "measured": host / device, "limit": 1.10})
    for row in rows:
        row["met"] = row["measured"] >= row["limit"] if row.pop("at_least", False) else row["measured"] <= row["limit"]
    return rows


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  torch {report['torch']}  grid {report['grid']}")
    for part in ("wan_1_3b", "wan_14b"):
        for name, row in (report.get(part) or {}).items():
            if isinstance(row, dict) and "seconds" in row:
                peak = f"{row['peak_bytes'] / GIB:6.2f} GiB" if row.get("peak_bytes") else "       -"
                print(f"{part:<9} {name:<28} {row['seconds']:8.2f} s  peak {peak}  {row.get('plan', '')[:24]:<24} "
                      f"{'; '.join(n[:60] for n in row.get('notes', []))}")
    for row in report["targets"]:
        print(f"{'MET ' if row['met'] else 'MISS'} {row['target']}: {row['measured']:.3f} (limit {row['limit']})")


if __name__ == "__main__":
    main()
