"""HetCache's plan families against fewer solver steps, from the runs `hetcache sweep` stored (docs/PLANS.md).

Reads every run under the sweep folders given, groups HetCache's runs by plan family (F/P/R or F/P; hold or a
forecast; solver steps uncapped, capped by `max_step_fraction`, or fixed by `step_fraction`), keeps the settings
that finished on every clip, and writes a figure (mean over clips of the per-frame PSNR in the mask against the
analytic FLOPs share, one line per family) and a markdown table.

    python benchmarks/plan_families.py SWEEP_DIR [SWEEP_DIR ...] --out docs/plans/families
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(run: dict) -> str | None:
    options = run.get("options") or {}
    if run["method"] == "fewer-steps":
        return "fewer steps (all FULL)"
    if run["method"] != "hetcache":
        return None
    if "step_fraction" not in run["key"]["config"]:  # stored before plans chose their solver steps
        return "F/P/R, hold, every step (the paper's plans)"
    letters = "F/P" if options.get("max_reuse", 3) == 0 else "F/P/R"
    reuse = options.get("reuse", "hold")
    if options.get("step_fraction") is not None:
        steps = "S' fixed"
    elif options.get("max_step_fraction") is not None:
        steps = f"S' <= {options['max_step_fraction']:g} S"
    else:
        steps = "S' uncapped"
    extra = ", light P" if "margin_ratio" in options else ""
    return f"{letters}, {reuse}, {steps}{extra}"


def load(folders: list[Path], only: set[str] | None = None) -> tuple[dict[str, list[tuple[float, float, str]]],
                                                                    list[str]]:
    """{family: [(mean FLOPs share, mean PSNR in the mask, label)]} over the clips a full ran on (or `only`)."""
    runs: dict[tuple[str, str], dict[str, dict]] = collections.defaultdict(dict)
    clips: set[str] = set()
    for folder in folders:
        for path in sorted(folder.glob("runs/*/*.json")):
            run = json.loads(path.read_text())
            if only is not None and run["clip"] not in only:
                continue
            if run.get("method") == "full":
                clips.add(run["clip"])
            name = family(run)
            if name is None or run.get("psnr_mask_per_frame") is None:
                continue
            runs[(name, run["label"])][run["clip"]] = run
    families: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for (name, label), by_clip in runs.items():
        if set(by_clip) >= clips:
            chosen = [by_clip[clip] for clip in sorted(clips)]
            families[name].append((sum(r["flops_ratio"] for r in chosen) / len(chosen),
                                   sum(r["psnr_mask_per_frame"] for r in chosen) / len(chosen), label))
    return {name: sorted(points) for name, points in families.items()}, sorted(clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .png and .md")
    parser.add_argument("--families", default="", help="semicolon list of families to draw (default: all)")
    parser.add_argument("--clips", default="", help="comma list of clips to average over (default: every clip)")
    args = parser.parse_args()
    families, clips = load(args.folders, set(args.clips.split(",")) if args.clips else None)
    wanted = [f.strip() for f in args.families.split(";") if f.strip()] or sorted(families)
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    lines = [f"Mean over {len(clips)} clips ({', '.join(clips)}): FLOPs share, PSNR in the mask (dB).", "",
             "| family | setting | FLOPs | PSNR mask |", "|---|---|---:|---:|"]
    for name in wanted:
        points = families.get(name, [])
        if not points:
            continue
        style = "k--" if name.startswith("fewer") else "-"
        axes.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=name)
        lines += [f"| {name} | {label} | {share:.3f} | {psnr:.2f} |" for share, psnr, label in points]
    axes.set_xlabel("analytic FLOPs share of full")
    axes.set_ylabel("PSNR in the mask against full (dB)")
    axes.set_title(f"HetCache plan families, proxy, 20 steps, mean over {len(clips)} clips", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out.with_suffix(".png"), dpi=110)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
