"""PARTIAL-forward time over FULL-forward time on the CPU, for a mid-size random WanVACE transformer.

A PARTIAL step that computes a fraction r of the token rows should cost about r of a FULL step: every
sub-layer of every main and VACE block runs on the selected rows only. This script measures the ratio in one
run, alternating the engine's FULL and PARTIAL steps so that the machine's drifting speed hits both alike, and
reports medians.

    .venv/bin/python benchmarks/cpu_sparse.py [--repeats 5] [--json out.json]

Model: dim 512 (8 heads x 64), FFN 2048, 8 main blocks, VACE blocks at 0, 2, 4, 6, 64 text tokens; latent grid
4 x 32 x 32 = 4,096 tokens; float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import WanVACETransformer3DModel

import hetcache
from hetcache import flops

GRID = (4, 32, 32)
TEXT_LEN = 64


def build_model() -> WanVACETransformer3DModel:
    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=256, ffn_dim=2048, num_layers=8, vace_layers=[0, 2, 4, 6], vace_in_channels=96,
        rope_max_seq_len=1024,
    )
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    frames, height, width = GRID[0], GRID[1] * 2, GRID[2] * 2
    return {
        "hidden_states": torch.randn(1, 16, frames, height, width, generator=generator),
        "control_hidden_states": torch.randn(1, 96, frames, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, 256, generator=generator),
    }


def coverage_for(fraction: float) -> torch.Tensor:
    """Token coverage with a centred box of about `fraction` of the tokens in every frame."""
    frames, height, width = GRID
    side_h = max(1, round(height * fraction**0.5))
    side_w = max(1, round(height * width * fraction / side_h))
    coverage = torch.zeros(GRID)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    coverage[:, top : top + side_h, left : left + side_w] = 1.0
    return coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, x = build_model(), inputs()
    timestep = torch.tensor([500.0])
    n = GRID[0] * GRID[1] * GRID[2]
    shape = flops.ModelShape.from_config(model.config)

    def call() -> float:
        start = time.perf_counter()
        with model.cache_context("cond"):
            model(timestep=timestep, return_dict=False, **x)
        return time.perf_counter() - start

    results = {"partial": []}
    for fraction in (0.5, 0.3):
        # FULL and PARTIAL steps alternate, so drift of this machine's speed hits both alike.
        plan = "F" + "PF" * (args.repeats + 1)
        config = hetcache.HetCacheConfig(
            plan=plan, margin=0, margin_ratio=0.0, context_ratio=0.0, selection="uniform"
        )
        hetcache.enable(model, config, token_mask=coverage_for(fraction))
        times = [call() for _ in plan]
        rows = min(hetcache.stats(model).rows)  # the PARTIAL steps' row count
        hetcache.disable(model)
        full = statistics.median(times[2::2])  # FULL steps after the first
        partial = statistics.median(times[1::2])
        r = rows / n
        analytic = flops.forward_flops(shape, n, rows, TEXT_LEN, text_kv=False) / flops.forward_flops(
            shape, n, n, TEXT_LEN, text_kv=False
        )
        results["partial"].append(
            {"r": r, "rows": rows, "partial_s": partial, "full_s": full, "ratio": partial / full,
             "ratio_over_r": partial / full / r, "analytic_ratio": analytic}
        )
    print(f"{'r':>6} {'rows':>6} {'PARTIAL ms':>11} {'FULL ms':>9} {'ratio':>7} {'ratio/r':>8} {'FLOPs ratio':>12}")
    for row in results["partial"]:
        print(f"{row['r']:6.3f} {row['rows']:6d} {1e3 * row['partial_s']:11.1f} {1e3 * row['full_s']:9.1f} "
              f"{row['ratio']:7.3f} {row['ratio_over_r']:8.3f} {row['analytic_ratio']:12.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
