"""The 14B models on one GPU (issue 19): Wan2.1-VACE-14B's shape and a two-expert Wan2.2-VACE-Fun-A14B pipeline,
through `hetcache.enable`, with random bf16 weights.

- 14B transformer (40 blocks, VACE blocks at 0, 5, ..., 35, dim 5120, 40 heads), 81 frames of 480x832 (32,760
  tokens), 512 text tokens, CFG: the stock forward, then a short plan FFPRPF; each call's time by step kind
  against the stock forward, and the cache bytes. Then CUDA-graph replay against eager on a small box (PARTIAL
  steps at r <= 0.3 replay graphs): the outputs must be equal bit for bit.
- Two-expert pipeline: two 14B transformers (other weights) in a `WanVACEPipeline` with `boundary_ratio` 0.875
  (33 frames: two experts' weights and the first expert's caches do not fit beside 81 frames' on one card), the
  tiny offline VAE, and prompt embeddings given directly; 6 steps with `guidance_scale_2`: the stock pipeline and
  hetcache with a plan that starts each expert FULL; per-expert letters and FLOPs, the switch step, times.

    python benchmarks/gpu_models.py --out models.json     # on the GPU (about 4 minutes on an H200)
    python benchmarks/gpu_models.py --smoke              # tiny shapes on the CPU (checks that it runs)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpu_memory import WAN_14B, build, inputs_for, sync  # noqa: E402
from gpu_transformer import TINY, box_coverage  # noqa: E402

import hetcache  # noqa: E402
from hetcache.hooks import engine_of  # noqa: E402
from hetcache.pipeline import build_tiny_random_pipeline, flow_scheduler, preview_timesteps  # noqa: E402

PLAN = "FFPRPF"


class CallTimer:
    """Times every forward of a module (CUDA events on the GPU, perf_counter on the CPU)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.cuda, self.marks, self.seconds = device.type == "cuda", [], []
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *args) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def _stop(self, *args) -> None:
        start = self.marks.pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            self.seconds.append(start.elapsed_time(end) / 1e3)
        else:
            self.seconds.append(time.perf_counter() - start)

    def remove(self) -> list[float]:
        for handle in self.handles:
            handle.remove()
        return self.seconds


def cfg_calls(model, inputs, timesteps, device) -> list[torch.Tensor]:
    uncond = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].flip(1))
    outputs = []
    for t in timesteps:
        step = torch.tensor([t], device=device)
        with model.cache_context("cond"):
            outputs.append(model(timestep=step, return_dict=False, **inputs)[0])
        with model.cache_context("uncond"):
            outputs.append(model(timestep=step, return_dict=False, **uncond)[0])
    sync(device)
    return outputs


def by_kind(letters: str, seconds: list[float]) -> dict[str, float]:
    """Median seconds of one call per step kind (each step has two calls, cond and uncond)."""
    out = {}
    for kind in "FPR":
        times = [seconds[2 * i + b] for i, letter in enumerate(letters) if letter == kind for b in (0, 1)]
        if times:
            out[kind] = float(np.median(times))
    return out


def part_14b(device, dtype, grid, cache: dict, keep=lambda out: None) -> dict:
    model = build(WAN_14B if device.type == "cuda" else dict(TINY, num_layers=5, vace_layers=[0]), device, dtype)
    inputs = inputs_for(model.config, grid, device, dtype)
    timesteps = preview_timesteps(flow_scheduler(3.0), len(PLAN)).tolist()
    out = {}
    timer = CallTimer(model, device)
    cfg_calls(model, inputs, timesteps[:1], device)  # warm-up
    cfg_calls(model, inputs, timesteps[:2], device)
    out["stock_s"] = float(np.median(timer.remove()[2:]))
    hetcache.enable(model, hetcache.HetCacheConfig(plan=PLAN, **cache), token_mask=box_coverage(grid, 0.25),
                    timesteps=torch.tensor(timesteps))
    cfg_calls(model, inputs, timesteps[:3], device)  # warm-up video (its first steps)
    hetcache.reset(model)
    timer = CallTimer(model, device)
    cfg_calls(model, inputs, timesteps, device)
    stats = hetcache.stats(model)
    hetcache.disable(model)
    kinds = by_kind(stats.plan, timer.remove())
    out.update({"plan": stats.plan, "seconds_by_kind": kinds, "x_stock": {k: v / out["stock_s"] for k, v in kinds.items()},
                "rows": stats.rows, "cache_bytes": stats.cache_bytes, "flops_ratio": stats.flops_ratio})
    keep(out)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        out["graph_check"] = graph_check(model, inputs, grid, timesteps, device, cache["cache_dtype"])
    except torch.OutOfMemoryError as error:  # the graphs' own memory beside the weights and caches
        out["graph_check"] = {"error": str(error).splitlines()[0]}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def graph_check(model, inputs, grid, timesteps, device, cache_dtype) -> dict:
    """The same plan with and without CUDA-graph replay of PARTIAL steps, on a box small enough for graphs."""
    outputs = {}
    for graphs in (False, True):
        config = hetcache.HetCacheConfig(plan="FPPPPF", margin=1, margin_ratio=0.3, context_ratio=0.02,
                                         cuda_graphs=graphs, cache_device="cuda", cache_dtype=cache_dtype)
        hetcache.enable(model, config, token_mask=box_coverage(grid, 0.08), timesteps=torch.tensor(timesteps))
        outputs[graphs] = cfg_calls(model, inputs, timesteps, device)
        engine = engine_of(model)
        captured = len(engine.graphs or ())
        hetcache.disable(model)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(outputs[False], outputs[True]))
    return {"graphs_captured": captured, "max_abs_diff": diff}


def part_two_experts(device, dtype, grid, cache: dict) -> dict:
    config = WAN_14B if device.type == "cuda" else dict(TINY, num_layers=5, vace_layers=[0])
    tiny = build_tiny_random_pipeline(two_experts=True)  # tokenizer, text encoder and VAE of the tiny pipeline
    experts = [build(config, device, dtype) for _ in range(2)]
    with torch.no_grad():
        for parameter in experts[1].parameters():  # other weights for the second expert
            parameter.mul_(0.9)
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae.to(device),
                           scheduler=flow_scheduler(3.0), transformer=experts[0], transformer_2=experts[1],
                           boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    frames, height, width = (grid[0] - 1) * 4 + 1, grid[1] * 16, grid[2] * 16
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 512 if device.type == "cuda" else 8, config["text_dim"], generator=generator)
    video = [np.full((height, width, 3), 127, dtype=np.uint8)] * frames
    mask = np.zeros((frames, height, width), dtype=np.uint8)
    mask[:, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    from PIL import Image

    def call() -> torch.Tensor:
        return pipe(video=[Image.fromarray(f) for f in video], mask=[Image.fromarray(m) for m in mask],
                    prompt_embeds=embeds.to(device, dtype), negative_prompt_embeds=embeds.flip(1).to(device, dtype),
                    height=height, width=width, num_frames=frames, num_inference_steps=len(PLAN), guidance_scale=5.0,
                    guidance_scale_2=4.0, generator=torch.Generator().manual_seed(0), output_type="pt").frames[0]

    switch = hetcache.expert_switch(pipe, len(PLAN))
    letters = list(PLAN)
    if switch is not None:
        letters[switch] = "F"  # each expert starts FULL (its caches are its own)
    plan = "".join(letters)
    out = {"switch": switch, "plan_asked": plan}
    call()  # warm-up
    sync(device)
    begin = time.perf_counter()
    stock = call()
    sync(device)
    out["stock_s"] = time.perf_counter() - begin
    hetcache.enable(pipe, hetcache.HetCacheConfig(plan=plan, **cache))
    sync(device)
    begin = time.perf_counter()
    cached = call()
    sync(device)
    out["hetcache_s"] = time.perf_counter() - begin
    stats = hetcache.stats(pipe)
    hetcache.disable(pipe)
    out.update({"plan": stats.plan, "experts": [{"plan": e.plan, "flops_ratio": e.flops_ratio, "cache_bytes":
                                                 e.cache_bytes} for e in stats.experts],
                "flops_ratio": stats.flops_ratio, "cache_bytes": stats.cache_bytes,
                "max_abs_diff_to_stock": float((cached.float() - stock.float()).abs().max())})
    return out


def save(path: str | None, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks that it runs)")
    parser.add_argument("--out", default=None, help="JSON file for every number")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: 14b,experts")
    parser.add_argument("--cache-dtype", choices=("bf16", "float8"), default="bf16",
                        help="the caches' dtype (float8 halves them, for cards smaller than an H200)")
    parser.add_argument("--cache-device", choices=("cuda", "cpu"), default="cuda",
                        help="where the two-expert part keeps its caches (the 14B part keeps them on the GPU)")
    args = parser.parse_args()
    cache_dtype = torch.float8_e4m3fn if args.cache_dtype == "float8" else None
    torch.set_grad_enabled(False)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    skip = set(filter(None, args.skip.split(",")))
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "cache_dtype": args.cache_dtype, "cache_device": args.cache_device}
    if "14b" not in skip:
        report["wan_14b"] = part_14b(device, dtype, (3, 6, 8) if args.smoke else (21, 30, 52),
                                     {"cache_device": "cuda", "cache_dtype": cache_dtype},
                                     keep=lambda out: save(args.out, {**report, "wan_14b": out}))
        save(args.out, report)  # what a later part's failure would otherwise lose
    if "experts" not in skip:
        report["two_experts"] = part_two_experts(device, dtype, (3, 4, 6) if args.smoke else (9, 30, 52),
                                                 {"cache_device": args.cache_device, "cache_dtype": cache_dtype})
    save(args.out, report)
    print_table(report)


def print_table(report: dict) -> None:
    print(f"device: {report['device']}  torch {report['torch']}")
    big = report.get("wan_14b")
    if big:
        kinds = ", ".join(f"{k} {1e3 * v:.0f} ms ({big['x_stock'][k]:.3f} x stock)" for k, v in big["seconds_by_kind"].items())
        print(f"14B, plan {big['plan']}: stock {1e3 * big['stock_s']:.0f} ms per call; {kinds}; cache "
              f"{big['cache_bytes'] / 2**30:.1f} GiB; FLOPs {big['flops_ratio']:.3f} of dense")
        check = big["graph_check"]
        if "error" in check:
            print(f"CUDA graphs vs eager: not run ({check['error']})")
        else:
            print(f"CUDA graphs vs eager: {check['graphs_captured']} graph(s), max abs diff {check['max_abs_diff']:.1e}")
    two = report.get("two_experts")
    if two:
        per = "; ".join(f"expert {i + 1}: {e['plan']} ({e['flops_ratio']:.3f})" for i, e in enumerate(two["experts"]))
        print(f"two experts, switch at step {two['switch']}: plan {two['plan']}; {per}; stock {two['stock_s']:.1f} s, "
              f"hetcache {two['hetcache_s']:.1f} s; cache {two['cache_bytes'] / 2**30:.1f} GiB; max abs diff to "
              f"stock {two['max_abs_diff_to_stock']:.3f}")


if __name__ == "__main__":
    main()
