"""`hetcache calibrate`: the HetCache configuration that suits the user's model, clips and step count.

Which plan is best at a given compute depends on the model: on one, running fewer solver steps keeps the output
closest to the full run; on another, PARTIAL steps over more solver steps do. So instead of trusting presets
tuned elsewhere, calibration measures: `full` once per clip, then a search over HetCache's configuration space on
the same clips with the sweep's machinery (same initial latents, resumable, `hetcache.sweep`), then the Pareto
front of PSNR in the mask (per-frame mean against `full`, mean over clips) against the analytic FLOPs share, and
the configuration chosen for a target: a FLOPs share, a measured speedup, or a fidelity floor in dB.

The search space (`search_points`): for each FLOPs share of a grid, HetCache's budget solved jointly with the
solver step count S': the F/P family (every step recomputes every generative token) holding its rows, with S'
capped at 1/2 or 3/4 of the steps or uncapped (`max_step_fraction`), linearly forecast or with lighter PARTIAL
steps (fewer margin and context rows) at the 3/4 cap; the F/P/R family (`max_reuse=3`, hold, S' solved with the
budget, uncapped); plus plain fewer solver steps in HetCache's own terms (all FULL over S' steps), so the front is
never below running fewer steps. "wide" adds more caps, quadratic forecasts, forecast F/P/R and longer PARTIAL
runs; "quick" (a first look) keeps two shares, fewer steps and the F/P family at the 3/4 cap and uncapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hetcache import files
from hetcache.bench import csv_table
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.sweep import Point, SweepClip, SweepSettings, point_config, run_sweep

SCHEMA = "hetcache-calibration/1"
METHOD = "hetcache"
SEARCHES = ("quick", "standard", "wide")
TARGETS = ("flops", "speedup", "psnr")
OUTPUT_FILES = ("front.json", "front.csv", "front.md", "front.png", "chosen.json")
SEARCH_DIR = "search"
# FLOPs shares (of the stock pipeline at the requested steps) the search plans for.
SHARES = {"quick": (0.25, 0.5), "standard": (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7),
          "wide": (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8)}
# PARTIAL steps' margin and context shares: the defaults, and lighter steps (more solver steps for the same FLOPs).
LIGHT_PARTIAL = {"margin_ratio": 0.35, "context_ratio": 0.02}
# Caps on the solver steps a budget buys (`max_step_fraction`; None: as many as fit): how many more solver steps
# PARTIAL steps should pay for is what differs most between models.
CAPS = {"quick": (0.75, None), "standard": (0.5, 0.75, None), "wide": (0.5, 0.6, 0.75, 0.9, None)}


@dataclass(frozen=True)
class Target:
    """What the chosen configuration must reach: at most a FLOPs share, at least a speedup, or at least a PSNR."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, _, value = text.partition("=")
        kind = kind.strip().lower()
        if kind not in TARGETS:
            raise UserError(f"target {text!r}: use flops=SHARE, speedup=TIMES or psnr=DB (e.g. flops=0.3)")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"target {text!r}: {value!r} is not a number") from None
        if not math.isfinite(number) or number <= 0 or (kind == "flops" and number > 1):
            raise UserError(f"target {text!r}: give a positive number{' up to 1' if kind == 'flops' else ''}")
        return cls(kind, number)

    def describe(self) -> str:
        return {"flops": f"at most {self.value:g} of the dense FLOPs", "speedup": f"at least {self.value:g}x faster",
                "psnr": f"at least {self.value:g} dB in the mask"}[self.kind]


def search_points(search: str = "standard") -> list[Point]:
    """The configurations a calibration runs (each a `hetcache` point of the sweep)."""
    if search not in SEARCHES:
        raise UserError(f"unknown search {search!r}: use one of {', '.join(SEARCHES)}")
    options: list[dict[str, Any]] = []
    for share in SHARES[search]:
        options.append({"delta": 0.0, "budget": None, "step_fraction": share})  # fewer solver steps, all FULL
        family = {"budget": share, "max_reuse": 0, "reuse": "hold"}  # F/P
        for cap in CAPS[search]:
            options.append({**family, "max_step_fraction": cap})
        if search == "quick":
            continue
        options.append({**family, "reuse": "linear", "max_step_fraction": 0.75})
        options.append({**family, **LIGHT_PARTIAL, "max_step_fraction": 0.75})
        options.append({"budget": share, "max_reuse": 3, "reuse": "hold"})  # F/P/R, S' solved with the budget
        if search == "wide":
            options.append({**family, "reuse": "quadratic", "max_step_fraction": 0.75})
            options.append({"budget": share, "max_reuse": 3, "reuse": "linear"})
            options.append({**family, "refresh_every": 8, "max_step_fraction": 0.75})
    return list(dict.fromkeys(Point(METHOD, tuple(sorted(o.items()))) for o in options))


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both FLOPs share (lower) and PSNR in the mask (higher), by FLOPs share."""
    usable = [r for r in rows if r.get("complete") and r.get("flops_ratio") is not None
              and r.get("psnr_mask_per_frame") is not None]
    usable.sort(key=lambda r: (r["flops_ratio"], -r["psnr_mask_per_frame"]))
    front, best = [], -math.inf
    for row in usable:
        if row["psnr_mask_per_frame"] > best:
            front.append(row)
            best = row["psnr_mask_per_frame"]
    return front


def choose(rows: Sequence[dict[str, Any]], target: Target) -> dict[str, Any]:
    """The configuration for `target`: the best PSNR within a FLOPs share or above a speedup, or the fewest FLOPs
    above a PSNR. UserError naming the closest configuration when none reaches it."""
    front = pareto_front(rows)
    if not front:
        raise UserError("no configuration finished on every clip: nothing to choose from")
    if target.kind == "flops":
        fits = [r for r in front if r["flops_ratio"] <= target.value + 1e-9]
        closest = min(front, key=lambda r: r["flops_ratio"])
        pick = max(fits, key=lambda r: r["psnr_mask_per_frame"]) if fits else None
    elif target.kind == "speedup":
        fits = [r for r in rows if r in front and (r.get("speedup") or 0.0) >= target.value]
        closest = max(front, key=lambda r: r.get("speedup") or 0.0)
        pick = max(fits, key=lambda r: r["psnr_mask_per_frame"]) if fits else None
    else:
        fits = [r for r in front if r["psnr_mask_per_frame"] >= target.value]
        closest = max(front, key=lambda r: r["psnr_mask_per_frame"])
        pick = min(fits, key=lambda r: r["flops_ratio"]) if fits else None
    if pick is None:
        raise UserError(f"no configuration reaches {target.describe()}; the closest is {closest['label']!r} "
                        f"({_summary(closest)}): relax the target or add clips and steps to search")
    return pick


def _summary(row: dict[str, Any]) -> str:
    speed = f", {row['speedup']:.2f}x" if row.get("speedup") else ""
    return f"{row['flops_ratio']:.3f} of the FLOPs, {row['psnr_mask_per_frame']:.2f} dB{speed}"


def calibrate(pipe: Any, clips: Sequence[SweepClip], settings: SweepSettings, out_dir: str | Path, target: Target,
              *, search: str = "standard", points: Sequence[Point] | None = None, progress: Any = None,
              show_bar: bool = True) -> dict[str, Any]:
    """Run the search (resumable, under out_dir/search; `points` replaces `search`'s), write the front and the
    chosen configuration; returns chosen.json's content."""
    out = Path(out_dir)
    points = list(points) if points is not None else search_points(search)
    results = run_sweep(pipe, clips, points, settings, out / SEARCH_DIR, progress=progress, show_bar=show_bar)
    rows = [r for r in results["points"] if r["method"] == METHOD]
    front = pareto_front(rows)
    pick = choose(rows, target)
    config = point_config(Point(METHOD, tuple(sorted(pick["options"].items()))), settings)
    chosen = {
        "schema": SCHEMA,
        "model": settings.model,
        "steps": settings.steps,
        "target": dataclasses.asdict(target),
        "clips": [c["id"] for c in results["clips"]],
        "measured": {key: pick.get(key) for key in ("flops_ratio", "speedup", "psnr_mask_per_frame", "ssim_mask")},
        "label": pick["label"],
        "config": config.to_dict(),
    }
    report = {"schema": SCHEMA, "settings": results["settings"], "clips": results["clips"], "target": chosen["target"],
              "search": search, "candidates": len(points), "front": front, "all": rows, "chosen": chosen}
    files.write_text(out / "front.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    files.write_text(out / "front.csv", csv_table(front, FRONT_COLUMNS))
    files.write_text(out / "front.md", front_markdown(report))
    write_front_plot(out / "front.png", rows, front, pick, results["points"])
    files.write_text(out / "chosen.json", json.dumps(chosen, indent=2) + "\n")
    return chosen


FRONT_COLUMNS = ("label", "steps", "flops_ratio", "speedup", "psnr_mask_per_frame", "ssim_mask", "clips")


def front_markdown(report: dict[str, Any]) -> str:
    chosen = report["chosen"]
    lines = [f"# Calibration: {report['settings']['model']}, {report['settings']['steps']} steps, "
             f"{len(report['clips'])} clip(s)", "",
             f"Target: {Target(**report['target']).describe()}. Chosen: `{chosen['label']}` "
             f"({_summary({**chosen['measured'], 'label': chosen['label']})}).", "",
             f"{report['candidates']} configurations searched ({report['search']}); PSNR is the per-frame mean inside "
             "the mask against `full`, mean over clips; FLOPs share is analytic, against the stock pipeline at the "
             "requested steps.", "",
             "| configuration | solver steps | FLOPs share | speedup | PSNR mask (dB) |", "|---|---|---|---|---|"]
    for row in report["front"]:
        speed = f"{row['speedup']:.2f}" if row.get("speedup") else "-"
        lines.append(f"| {row['label']} | {row['steps']:.1f} | {row['flops_ratio']:.3f} | {speed} | "
                     f"{row['psnr_mask_per_frame']:.2f} |")
    return "\n".join(lines) + "\n"


def write_front_plot(path: Path, rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
                     pick: dict[str, Any], all_points: Sequence[dict[str, Any]]) -> None:
    """Every configuration searched (grey), the front (line), all-FULL fewer-steps points, and the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    usable = [r for r in rows if r.get("flops_ratio") is not None and r.get("psnr_mask_per_frame") is not None]
    axis.scatter([r["flops_ratio"] for r in usable], [r["psnr_mask_per_frame"] for r in usable], s=14, color="0.7",
                 label="configurations searched")
    fewer = [r for r in usable if r["options"].get("delta") == 0.0]
    axis.plot([r["flops_ratio"] for r in fewer], [r["psnr_mask_per_frame"] for r in fewer], "s--", color="tab:gray",
              ms=4, label="fewer solver steps (all FULL)")
    axis.plot([r["flops_ratio"] for r in front], [r["psnr_mask_per_frame"] for r in front], "o-", color="tab:red",
              ms=4, label="Pareto front")
    axis.scatter([pick["flops_ratio"]], [pick["psnr_mask_per_frame"]], s=120, facecolors="none", edgecolors="k",
                 label="chosen")
    axis.set_xlabel("FLOPs share of the stock pipeline (analytic)")
    axis.set_ylabel("PSNR in the mask vs full (dB, per-frame mean)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    files.save_figure(fig, path)
    plt.close(fig)


def default_clips(model: str) -> tuple[list[SweepClip], list[str]]:
    """The clips calibration uses when none are given: the demo's generated removal clip and, in a development
    checkout, ../shared/data/driving.mp4 with its mask."""
    from hetcache.pipeline import prepare_for_model
    from hetcache.proxy.quality import EDIT_PROMPT, to_uint8
    from hetcache.proxy.scenes import removal_scene

    video, mask, _ = removal_scene(17, 256, 256, seed=3)  # 17 frames of 256x256 fit every Wan-VACE model
    clips = [SweepClip("demo_scene3", to_uint8(video[0]), mask[0, 0].numpy(), EDIT_PROMPT,
                       "removal_scene(17, 256, 256, seed=3)")]
    notes = []
    driving = Path("../shared/data/driving.mp4")
    if driving.is_file() and driving.with_name("driving_mask.mp4").is_file():
        prepared = prepare_for_model(model, driving, driving.with_name("driving_mask.mp4"), None, None, None, None)
        clips.append(SweepClip("driving", prepared.video, prepared.mask, "an empty road", str(driving)))
    else:
        notes.append("../shared/data/driving.mp4 not found: calibrating on the generated clip only")
    return clips, notes


def calibrate_main(source: Path | str | None, mask: Path | str | None, box: str | None, prompt: str | None, *,
                   out: Path | str, target: str, model: str, steps: int, search: str = "standard",
                   layout: str = "folder", frames: int | None = None, height: int | None = None,
                   width: int | None = None, seed: int = 0, guidance: float = 5.0, negative_prompt: str = "",
                   device: str = "auto", dtype: str = "auto", limit: int | None = None) -> dict[str, Any]:
    """`hetcache calibrate`: check the arguments, load clips and model, search, print the front and the choice."""
    from hetcache.pipeline import load_pipeline, resolve_device, resolve_dtype
    from hetcache.sweep import load_clips, prepare_output

    goal = Target.parse(target)
    search_points(search)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    if source is None:
        clips, notes = default_clips(model)
    else:
        clips, notes = load_clips(source, mask, box, prompt, model, layout, frames, height, width, limit)
    prepare_output(out, OUTPUT_FILES, source, mask, box, notes)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    _, first_height, first_width = clips[0].mask.shape
    pipe = load_pipeline(model, torch_device, torch_dtype, height=first_height, width=first_width)
    settings = SweepSettings(model=model, steps=steps, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                             device=torch_device.type, dtype=str(torch_dtype).removeprefix("torch."))
    chosen = calibrate(pipe, clips, settings, out, goal, search=search,
                       progress=lambda line: tqdm.write(line, file=sys.stderr))
    print((out / "front.md").read_text(encoding="utf-8"), end="")
    print("wrote " + ", ".join(str(out / name) for name in OUTPUT_FILES) + f" and {out / SEARCH_DIR}/")
    print(f"use it: hetcache edit ... --config {out / 'chosen.json'} (bench, sweep, eval: with {METHOD} among "
          "--methods), or HetCacheConfig.from_file")
    return chosen


def config_options(path: str | Path) -> dict[str, Any]:
    """The hetcache method's options that a config file (`--config`) gives: the fields of its config that differ
    from HetCacheConfig's defaults (HetCacheConfig(**them) is the file's config), JSON-ready."""
    defaults = HetCacheConfig().to_dict()
    return {key: value for key, value in load_config(path).to_dict().items() if value != defaults[key]}


def load_config(path: str | Path) -> HetCacheConfig:
    """A config file (`HetCacheConfig.to_dict`, or `chosen.json`) for `--config`, with one-line errors."""
    try:
        return HetCacheConfig.from_file(path)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"config file {path} is not a HetCache config: {error}") from None
