"""The proxy's quality report: loss curves of its training run and inpainting quality on held-out clips.

    python -m hetcache.proxy.report TRAIN_LOG.json [TRAIN_LOG.json ...] --out docs/proxy [--clips 8 --steps 20]

Training may come in several runs (`--init`), given in order: each stage's curve continues from run to run.

For every held-out clip it runs the shipped proxy with full compute and with HetCache's fast preset, and the
median-fill baseline, and measures PSNR inside the mask against the hidden ground truth, plus the fast preset's
PSNR against the full-compute output (what the cache gives up). Writes report.json, loss.png and heldout.png
(one row per clip: input, baseline, proxy, proxy with HetCache, ground truth, at the middle frame).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import hetcache
from hetcache.metrics import psnr
from hetcache.pipeline import PROXY, load_pipeline, run_edit
from hetcache.proxy.quality import EDIT_PROMPT, held_out_clips, mask_psnr, median_fill


def plot_losses(logs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    stages = (("vae", "VAE: L1 + L2 (+ latent penalty)"), ("transformer", "transformer: flow matching (v)"))
    for axis, (stage, title) in zip(axes, stages):
        offset = 0
        for number, log in enumerate(logs, 1):
            if not log.get(stage, {}).get("steps"):
                continue
            curve = np.array(log[stage]["curve"])
            axis.plot(curve[:, 0] + offset, curve[:, 2], label=f"run {number}")
            offset += log[stage]["steps"]
        axis.legend()
        axis.set(title=title, xlabel="step", ylabel="loss", yscale="log")
        axis.grid(alpha=0.3)
    devices = sorted({log["device"] for log in logs})
    figure.suptitle(f"proxy training on {', '.join(devices)} (model seed {logs[0]['config']['seed']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate(clips: int, steps: int) -> tuple[dict, list[np.ndarray]]:
    """Per-clip PSNRs and CPU timings; the middle frames for the picture."""
    pipe = load_pipeline(PROXY, "cpu", "fp32", height=256, width=256)
    rows, pictures = [], []
    for index, clip in enumerate(held_out_clips(clips)):
        start = time.perf_counter()
        full = run_edit(pipe, clip.video, clip.mask, EDIT_PROMPT, steps=steps, guidance=1.0).frames
        full_s = time.perf_counter() - start
        hetcache.enable(pipe, hetcache.HetCacheConfig.fast())
        start = time.perf_counter()
        fast = run_edit(pipe, clip.video, clip.mask, EDIT_PROMPT, steps=steps, guidance=1.0).frames
        fast_s = time.perf_counter() - start
        plan = hetcache.stats(pipe).plan
        hetcache.disable(pipe)
        baseline = median_fill(clip.video, clip.mask)
        full, fast = (np.where(clip.mask[..., None], frames, clip.target) for frames in (full, fast))
        rows.append({
            "clip": index,
            "mask_area": float(clip.mask.mean()),
            "psnr_mask_median_fill": mask_psnr(baseline, clip),
            "psnr_mask_full": mask_psnr(full, clip),
            "psnr_mask_hetcache_fast": mask_psnr(fast, clip),
            "psnr_fast_vs_full": psnr(fast, full, clip.mask),
            "seconds_full": full_s,
            "seconds_hetcache_fast": fast_s,
            "plan": plan,
        })
        middle = len(clip.mask) // 2
        pictures.append(np.concatenate(
            [frames[middle] for frames in (clip.video, baseline, full, fast, clip.target)], axis=1
        ))
        print(json.dumps(rows[-1]), flush=True)
    means = {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key not in ("clip", "plan")}
    return {"clips": rows, "mean": means, "steps": steps, "device": "cpu"}, pictures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("train_logs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_losses([json.loads(path.read_text()) for path in args.train_logs], args.out / "loss.png")
    report, pictures = evaluate(args.clips, args.steps)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    from PIL import Image

    Image.fromarray(np.concatenate(pictures, axis=0)).save(args.out / "heldout.png")
    print(json.dumps(report["mean"], indent=1))


if __name__ == "__main__":
    main()
