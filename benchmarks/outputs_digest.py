"""Digest of every method's output on tiny-random and the proxy: checks that a refactor changes no output bit.

    python benchmarks/outputs_digest.py --out before.json      # on the old commit
    python benchmarks/outputs_digest.py --out after.json --compare before.json

Each method (and HetCache with fixed plans that run PARTIAL steps) edits the same clip from the same seed (tiny-random: demo clip at 64x32, 9 frames, 6 steps; proxy: the
demo's removal scene at 256x256, 17 frames, 8 steps) and the SHA-256 of its raw output frames is recorded, with its plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np
import torch

import hetcache
from hetcache.config import HetCacheConfig
from hetcache.methods import METHOD_NAMES, inference_steps, method_config, unavailable_reason
from hetcache.pipeline import load_pipeline, run_edit
from hetcache.proxy.quality import to_uint8
from hetcache.proxy.scenes import removal_scene

RUNS = {  # model: (frames, height, width, steps)
    "tiny-random": (9, 32, 64, 6),
    "proxy": (17, 256, 256, 8),
}


def clip(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo's generated removal scene as uint8 [F, H, W, 3] video and bool [F, H, W] mask."""
    video, mask, _ = removal_scene(frames, height, width, seed=0)
    return to_uint8(video[0]), mask[0, 0].numpy()


def configs(steps: int) -> dict[str, object]:
    """Every method at its defaults, and HetCache with fixed plans that run PARTIAL steps (EMA and a smaller
    cache dtype included), which short default plans may not."""
    plan = ("FP" + "PRP" * steps)[: steps - 1] + "F"
    out = {name: method_config(name) for name in METHOD_NAMES if not unavailable_reason(name)}
    out["hetcache-plan"] = HetCacheConfig(plan=plan)
    out["hetcache-plan-ema-bf16"] = HetCacheConfig(plan=plan, ema_alpha=0.3, cache_dtype=torch.bfloat16)
    return out


def digests(model: str) -> dict[str, dict[str, str]]:
    frames, height, width, steps = RUNS[model]
    pipe = load_pipeline(model, "cpu", "fp32", height=height, width=width)
    video, mask = clip(frames, height, width)
    out = {}
    for name, config in configs(steps).items():
        run_steps = inference_steps(config, steps)
        if hasattr(config, "prepare"):  # MagCache calibrates its ratios on one plain run
            config.prepare(pipe.transformer, run_steps,
                           lambda: run_edit(pipe, video, mask, "an empty road", steps=run_steps, seed=0))
        hetcache.enable(pipe, config)
        result = run_edit(pipe, video, mask, "an empty road", steps=run_steps, seed=0)
        plan = hetcache.stats(pipe).plan
        hetcache.disable(pipe)
        out[name] = {"sha256": hashlib.sha256(np.ascontiguousarray(result.frames).tobytes()).hexdigest(), "plan": plan}
        print(f"{model:<12} {name:<20} {plan:<12} {out[name]['sha256'][:16]}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare")
    parser.add_argument("--models", default="tiny-random,proxy")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {model: digests(model) for model in args.models.split(",")}
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    if args.compare:
        with open(args.compare) as handle:
            before = json.load(handle)
        changed = [f"{m}/{n}" for m in results for n in results[m] if before.get(m, {}).get(n) != results[m][n]]
        print("identical" if not changed else "CHANGED: " + ", ".join(changed))
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
