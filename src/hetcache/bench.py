"""Side-by-side benchmark of the caches on the user's own video, and the step-plan preview.

`run_bench` edits one video with every method like for like (`hetcache.runner`: the same inputs, seed and initial
latents, step-dependent defaults fitted to the step count, the same compilation with `compile`), times the
denoising loop, and compares each output with `full`'s: pooled and per-frame PSNR and SSIM over the frame,
inside the mask and on the margin band, LPIPS over the frame and inside the mask with user-supplied weights. When
`fewer-steps` is among the methods it also runs at the FLOPs share each HetCache run reached (rows named
`fewer-steps@0.33`), so every preset has a step-count baseline at equal compute. It writes results.json (schema:
docs/RESULTS_SCHEMA.md), results.csv, results.md, pareto.png and side_by_side.mp4 into the output folder; rows of
methods with a caveat (`methods.method_flag`) carry it in every file.

Timing: `pipeline.run_edit`'s "denoise" span, from the first transformer call to the end of the last step (a
transformer pre-hook and `callback_on_step_end`, synchronised on CUDA), so text encoding and VAE work are out.
One 1-step run of the plain pipeline comes first and is not timed (it pays for lazy initialisation: CUDA
context, kernel selection, allocator growth). MagCache's calibration run (diffusers' own recipe when no
`mag_ratios` are given) is not timed either; with `compile` every method runs once untimed first. Speedups divide
`full`'s time by the method's, both from this run and in the same mode (eager or compiled).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

import hetcache
from hetcache import compat, files, flops, parallel, plan, tokens
from hetcache import video as vio
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.memory import estimate_memory
from hetcache.methods import (
    METHOD_NAMES,
    check_method_name,
    inference_steps,
    method_config,
    method_flag,
    short_flag,
    unavailable_reason,
)
from hetcache.methods.pab import PABConfig, broadcast_steps
from hetcache.methods.simple import FewerStepsConfig, FullConfig
from hetcache.metrics import BAND_PX, FIDELITY_KEYS, LPIPS, fidelity
from hetcache.pipeline import (
    MAX_FRAMES_ROPE,
    check_prompt,
    default_guidance,
    experts,
    largest_area,
    load_for_planning,
    load_pipeline,
    native_size,
    preview_timesteps,
    resolve_device,
    resolve_dtype,
    run_edit,
)
from hetcache.runner import (
    REFERENCE,
    WARMUP_STEPS,
    cache_options,
    check_fit,
    compile_blocks,
    describe_failure,
    describe_fit,
    initial_latents,
    method_configs,
    run_method,
    timing_note,
)

SCHEMA = "hetcache-bench/1"
DEFAULT_METHODS = ",".join(METHOD_NAMES)
RESULT_FILES = ("results.json", "results.csv", "results.md", "pareto.png", "side_by_side.mp4")
MATCHED = "fewer-steps"  # the baseline run again at each HetCache run's FLOPs share
# One row per method in results.csv (and per record in results.json, which adds `config` and `notes`).
COLUMNS = (
    "name", "steps", "plan", "denoise_s", "speedup", "flops", "flops_ratio", "peak_memory_bytes", "cache_bytes",
    *FIDELITY_KEYS, "identical", "flag",
)
_MAX_GRID_WIDTH = 3840  # side_by_side.mp4 tiles shrink (by whole factors) to stay within 4K width


# ------------------------------------------------------------------------------------------------ methods
def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Method names from "a,b,c" (or "all"), checked, duplicates dropped, `full` first (it is the reference)."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        names = list(METHOD_NAMES)
    if not names:
        raise UserError(f"no method given: use a comma-separated list of {', '.join(METHOD_NAMES)} (or all)")
    unique = [check_method_name(n) for n in dict.fromkeys(names)]
    return [REFERENCE] + [n for n in unique if n != REFERENCE]


def _ordered(methods: Sequence[str | tuple[str, Any]]) -> list[str | tuple[str, Any]]:
    """`methods` with `full` first (added when missing) and duplicates dropped, given configs kept."""
    pairs = [(m, None) if isinstance(m, str) else tuple(m) for m in methods]
    given = dict(pairs)
    return [name if given.get(name) is None else (name, given[name]) for name in parse_methods(list(given))]


# ------------------------------------------------------------------------------------------------ running
def run_bench(
    pipe: Any,
    video: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    methods: Sequence[str | tuple[str, Any]],
    *,
    steps: int,
    seed: int = 0,
    guidance: float = 5.0,
    out_dir: str | Path,
    negative_prompt: str = "",
    fps: float = 16.0,
    lpips_weights: str | Path | None = None,
    lpips: LPIPS | None = None,
    band_px: int = BAND_PX,
    method_options: dict[str, dict[str, Any]] | None = None,
    compile: bool = False,
    progress: Callable[[str], None] | None = print,
    guidance_2: float | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every method (names, or (name, config) pairs) on one edit and write the result files; returns the
    results.json content. `video` uint8 [F,H,W,3] and `mask` bool [F,H,W] must already fit the model.
    `method_options` ({method: {option: value}}) go to the methods' configs, `cache` ({"cache_device",
    "cache_dtype"}) to every HetCache method's (`runner.cache_options`); `compile` compiles the reference and
    every method the same way (`runner.compile_blocks`). `guidance_2`: a two-expert pipeline's second guidance.
    `lpips`: the LPIPS model when the caller loaded `lpips_weights` already. Before anything denoises, every HetCache cache must fit the device or the host (`runner.check_fit`)."""
    say = progress or (lambda line: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a folder")
    ordered = _ordered(methods)
    options = cache_options([m if isinstance(m, str) else m[0] for m in ordered], method_options, cache)
    configs = method_configs(ordered, steps=steps, options=options, compile=compile)
    fits = check_fit(pipe, configs, *mask.shape, guidance)
    if parallel.is_main_process():  # under torchrun only rank 0 writes
        out.mkdir(parents=True, exist_ok=True)
    if lpips is None and lpips_weights:
        lpips = LPIPS.from_file(lpips_weights, compat.execution_device(pipe))
    latents = initial_latents(pipe, *mask.shape, seed)
    common = dict(negative_prompt=negative_prompt, guidance=guidance, seed=seed, latents=latents,
                  guidance_2=guidance_2)

    hetcache.disable(pipe)
    if compile:
        compile_blocks(pipe)
    run_edit(pipe, video, mask, prompt, steps=WARMUP_STEPS, **common)

    records, skipped, outputs = [], [], {}

    def run(name: str, method: str, config: Any) -> None:
        reason = unavailable_reason(method)
        if reason is not None:
            skipped.append({"name": name, "reason": reason})
            say(f"{name:<20} skipped: {reason}")
            return
        run_steps = inference_steps(config, steps)
        try:
            done = run_method(pipe, config, video, mask, prompt, run_steps, common, untimed_first=compile)
        except Exception as error:  # noqa: BLE001 - one failing method must not lose the others' results
            hetcache.disable(pipe)
            if name == REFERENCE:
                raise
            skipped.append({"name": name, "reason": describe_failure(error)})
            say(f"{name:<20} {skipped[-1]['reason']}")
            return
        outputs[name] = done.frames
        record = _record(name, method, config, run_steps, done, outputs[REFERENCE], records, mask, band_px, lpips)
        records.append(record)
        say(_progress_line(record))
        if timing_note(record["speedup"], record["flops_ratio"]):
            say(f"warning: {name}: {record['notes'][-1]}")

    for name, config in configs:
        run(name, name, config)
    for name, config in _matched_baselines(records, [name for name, _ in configs], steps):
        run(name, MATCHED, config)

    settings = _settings(pipe, mask, prompt, negative_prompt, steps, seed, guidance, band_px, lpips_weights, compile)
    settings["guidance_2"] = guidance_2
    settings["experts"] = len(experts(pipe))
    settings["cache_estimates"] = {name: {"bytes": estimate.total, "where": where,
                                          "text": describe_fit(estimate, where, compat.execution_device(pipe))}
                                   for name, (estimate, where) in fits.items()}
    results = {"schema": SCHEMA, "settings": settings, "methods": records, "skipped": skipped}
    if parallel.is_main_process():
        _write_results(out, results)
        _write_pareto(out / "pareto.png", records)
        _write_side_by_side(out / "side_by_side.mp4", video, mask, outputs, fps)
    return results


def _matched_baselines(records: list[dict[str, Any]], names: list[str], steps: int) -> list[tuple[str, Any]]:
    """`fewer-steps` at the FLOPs share of every HetCache run (when fewer-steps was asked for): (name, config)
    pairs named `fewer-steps@SHARE`, leaving out step counts that already ran."""
    if MATCHED not in names:
        return []
    ran = {r["steps"] for r in records if r["name"].split("@")[0] == MATCHED}
    matched = []
    for record in records:
        share = record["flops_ratio"]
        if not record["name"].startswith("hetcache") or share is None:
            continue
        count = max(1, round(steps * share))
        if count not in ran:
            ran.add(count)
            matched.append((f"{MATCHED}@{share:.2f}", FewerStepsConfig(steps_fraction=count / steps)))
    return matched


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _record(name: str, method: str, config: Any, steps: int, done: Any, reference: np.ndarray,
            previous: list[dict], mask: np.ndarray, band_px: int, lpips: LPIPS | None) -> dict[str, Any]:
    stats, denoise = done.stats, done.denoise_s
    reference_time = previous[0]["denoise_s"] if previous else denoise
    reference_flops = previous[0]["flops"] if previous else (stats.flops if stats.dense_flops else None)
    observed = stats.dense_flops > 0
    scores = fidelity(done.frames, reference, mask, band_px=band_px, lpips=lpips)
    speedup = reference_time / denoise if denoise > 0 else None
    flops_ratio = stats.flops / reference_flops if observed and reference_flops else None
    caveat = timing_note(speedup, flops_ratio)
    return {
        "name": name,
        "steps": len(stats.plan) or steps,  # the solver steps that ran (HetCache may run fewer than asked)
        "plan": stats.plan,
        "denoise_s": denoise,
        "speedup": speedup,
        "flops": stats.flops if observed else None,
        "flops_ratio": flops_ratio,
        "peak_memory_bytes": done.peak_memory_bytes,
        "cache_bytes": stats.cache_bytes,
        **{key: _finite(value) for key, value in scores.items()},
        "identical": bool(np.array_equal(done.frames, reference)),
        "flag": method_flag(method),
        "config": config.to_dict(),
        "notes": list(stats.notes) + ([caveat] if caveat else []),
    }


def _progress_line(record: dict[str, Any]) -> str:
    psnr = "identical" if record["identical"] else _fmt(record["psnr_mask_per_frame"], "{:.2f} dB")
    flag = f"  [{short_flag(record['flag'])}]" if record["flag"] else ""
    return (f"{record['name']:<20} {record['denoise_s']:8.3f} s  {_fmt(record['speedup'], 'x{:.2f}'):>6}  "
            f"FLOPs {_fmt(record['flops_ratio'], '{:.2f}')}  PSNR mask {psnr}  plan {record['plan'] or '-'}{flag}")


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _settings(pipe: Any, mask: np.ndarray, prompt: str, negative_prompt: str, steps: int, seed: int,
              guidance: float, band_px: int, lpips_weights: Any, compile: bool) -> dict[str, Any]:
    import diffusers

    frames, height, width = mask.shape
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "seed": seed,
        "guidance": guidance,
        "frames": frames,
        "height": height,
        "width": width,
        "device": str(compat.execution_device(pipe)),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "compile": compile,
        "context_parallel": group.degree if (group := parallel.ulysses_group(pipe.transformer)) else 1,
        "reference": REFERENCE,
        "band_px": band_px,
        "warmup": f"one {WARMUP_STEPS}-step run of the plain pipeline before timing, not timed"
                  + ("; every method once more, untimed, before its timed run (compilation)" if compile else ""),
        "timing": "denoising loop: first transformer call to the end of the last step",
        "lpips": str(lpips_weights) if lpips_weights else "not computed",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"hetcache": hetcache.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }


# ------------------------------------------------------------------------------------------------ writing
def _write_results(out: Path, results: dict[str, Any]) -> None:
    files.write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    files.write_text(out / "results.csv", csv_table(results["methods"], COLUMNS))
    files.write_text(out / "results.md", results_markdown(results))


def csv_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with one line per row; null values as empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return buffer.getvalue()


def flag_notes(names_and_flags: Sequence[tuple[str, str | None]]) -> list[str]:
    """Markdown lines explaining each flag once: "- `name`: flag"."""
    seen = dict.fromkeys((name, flag) for name, flag in names_and_flags if flag)
    return [f"- `{name}`: {flag}" for name, flag in seen]


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report: settings, one table row per method, flags, skipped methods, notes."""
    s = results["settings"]
    mode = "compiled (reference and every method)" if s["compile"] else "eager"
    guidance = f"guidance {s['guidance']:g}" + (f" (second expert {s['guidance_2']:g})"
                                                 if s.get("guidance_2") is not None else "")
    experts_text = ", two experts" if s.get("experts", 1) > 1 else ""
    lines = [
        "# hetcache bench",
        "",
        f"{s['frames']} frames at {s['width']}x{s['height']}, {s['steps']} steps, {guidance}{experts_text}, "
        f"seed {s['seed']}, {s['device']}/{s['dtype']}, {mode}; prompt: \"{s['prompt']}\"",
        "",
        f"Time: {s['timing']} ({s['warmup']}). Fidelity against `{s['reference']}`: PSNR (dB) as the mean over "
        f"frames of each frame's PSNR (the pooled PSNR over all frames is in results.json/.csv), over the frame, "
        f"inside the mask and on a {s['band_px']}-pixel band around it; SSIM inside the mask; LPIPS over the frame "
        f"and inside the mask: {s['lpips']}.",
        "",
        "| method | steps | plan | denoise s | speedup | FLOPs | PSNR frame | PSNR mask | PSNR band | SSIM mask "
        "| LPIPS | LPIPS mask | peak memory | flag |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["methods"]:
        psnr = ["=" if r["identical"] else _fmt(r[f"psnr_{k}_per_frame"], "{:.2f}") for k in ("frame", "mask", "band")]
        cells = [
            f"`{r['name']}`", str(r["steps"]), f"`{r['plan']}`" if r["plan"] else "-", f"{r['denoise_s']:.3f}",
            _fmt(r["speedup"], "{:.2f}x"), _fmt(r["flops_ratio"], "{:.2f}"), *psnr, _fmt(r["ssim_mask"], "{:.4f}"),
            _fmt(r["lpips"], "{:.4f}"), _fmt(r["lpips_mask"], "{:.4f}"), _fmt(r["peak_memory_bytes"], "{:,}"),
            short_flag(r["flag"]) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plan letters: F computed, P partly reused, R reused (first CFG branch); FLOPs: analytic, "
              "relative to `full` (both CFG branches); `=`: identical to `full`; `fewer-steps@S`: fewer-steps at the "
              "FLOPs share S a HetCache row reached."]
    estimates = s.get("cache_estimates") or {}
    if estimates:
        lines += ["", "Cache estimate (`hetcache.memory`, checked before denoising): "
                  + "; ".join(f"`{name}` {value['text']}" for name, value in estimates.items()) + "."]
    if s["device"].startswith("cpu"):
        lines += ["", "Timings on a CPU swing several-fold when other work shares the machine: speedups here are "
                  "noisy (a row whose speedup exceeds its analytic bound carries a note)."]
    flags = flag_notes([(r["name"], r["flag"]) for r in results["methods"]])
    if flags:
        lines += ["", "Flags:", ""] + flags
    if results["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- `{s['name']}`: {s['reason']}" for s in results["skipped"]]
    notes = [f"- `{r['name']}`: {note}" for r in results["methods"] for note in r["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def _write_pareto(path: Path, records: list[dict[str, Any]]) -> list[str]:
    """Speedup against PSNR in the mask, one labelled point per record; returns the labels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["psnr_mask_per_frame"] for r in records if r["psnr_mask_per_frame"] is not None]
    ceiling = (max(finite) if finite else 30.0) + 3.0
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    labels = []
    for r in records:
        if r["speedup"] is None or (r["psnr_mask_per_frame"] is None and not r["identical"]):
            continue
        y = ceiling if r["identical"] else r["psnr_mask_per_frame"]
        marker = "*" if r["identical"] else "o"
        ax.scatter(r["speedup"], y, marker=marker, s=80 if r["identical"] else 40,
                   facecolors="none" if r["flag"] else None, edgecolors="C3" if r["flag"] else None)
        label = r["name"] + (" (= full)" if r["identical"] and r["name"] != REFERENCE else "")
        label += f" [{short_flag(r['flag'])}]" if r["flag"] else ""
        ax.annotate(label, (r["speedup"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        labels.append(label)
    ax.set_xlabel(f"speedup over {REFERENCE} (denoising time, same mode)")
    ax.set_ylabel(f"PSNR to {REFERENCE} inside the mask (dB, mean over frames)")
    ax.set_title("hetcache bench (stars: identical to full; hollow red: flagged rows)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)
    return labels


def _labelled(frames: np.ndarray, label: str, shrink: int) -> np.ndarray:
    tiles = []
    for frame in frames:
        image = Image.fromarray(frame)
        if shrink > 1:
            image = image.resize((frame.shape[1] // shrink, frame.shape[0] // shrink), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(image)
        box = draw.textbbox((4, 2), label)
        draw.rectangle((0, 0, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
        tiles.append(np.asarray(image))
    return np.stack(tiles)


def _write_side_by_side(path: Path, video: np.ndarray, mask: np.ndarray, outputs: dict[str, np.ndarray],
                        fps: float) -> None:
    """A grid of labelled tiles: the input with the mask tinted, then every method's output."""
    panels = [("input (mask tinted)", vio.mask_overlay(video, mask))] + list(outputs.items())
    columns = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / columns)
    _, height, width, _ = video.shape
    shrink = 1
    while columns * width // shrink > _MAX_GRID_WIDTH or (height // shrink) % 2 or (width // shrink) % 2:
        shrink += 1
    tiles = [_labelled(frames, label, shrink) for label, frames in panels]
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (rows * columns - len(tiles))
    grid = np.concatenate([np.concatenate(tiles[r * columns : (r + 1) * columns], axis=2) for r in range(rows)], axis=1)
    vio.write_video(path, grid, fps)


# ------------------------------------------------------------------------------------------------ plans
def plan_table(
    target: Any,
    steps: int,
    methods: str | Sequence[str],
    *,
    mask: torch.Tensor,
    text_len: int = 512,
    overrides: dict[str, dict[str, Any]] | None = None,
    branches: int = 2,
) -> list[dict[str, Any]]:
    """Each method's step plan and analytic cost (fraction of `full`'s FLOPs) for `steps` steps, without
    denoising. `target` is a WanVACEPipeline (its scheduler gives the timesteps) or the transformer; `mask` is the
    pixel mask [F, H, W] (True = generate) that sets the token counts. Content-adaptive methods have no plan
    before they run: their `plan` and `flops_ratio` are None. `branches`: CFG branches (for the cache estimate)."""
    return [plan_row(target, steps, name, method_config(name, steps=steps, **(overrides or {}).get(name, {})),
                     mask=mask, text_len=text_len, branches=branches) for name in parse_methods(methods)]


def plan_row(target: Any, steps: int, name: str, config: Any, *, mask: torch.Tensor,
             text_len: int = 512, branches: int = 2) -> dict[str, Any]:
    """One method's step plan and analytic FLOPs share of `full` for `steps` steps (see `plan_table`), from its
    config: {"name", "steps", "plan", "flops_ratio", "note", "switch", "memory"}: `switch` is the first solver
    step of a two-expert pipeline's second expert (None with one), `memory` the `MemoryEstimate` of a HetCache
    engine config's caches in bfloat16 (None for other methods)."""
    transformer = getattr(target, "transformer", target)
    shape = flops.ModelShape.from_config(transformer.config)
    grid = tokens.latent_grid(tuple(mask.shape), tuple(transformer.config.patch_size))
    n = grid[0] * grid[1] * grid[2]
    dense = flops.forward_flops(shape, n, n, text_len, text_kv=False)
    row = {"name": name, "steps": inference_steps(config, steps), "plan": None, "flops_ratio": None, "note": "",
           "switch": None, "memory": None}
    if isinstance(config, HetCacheConfig):
        row["memory"] = estimate_memory(transformer, *mask.shape, config, text_len=text_len, branches=branches)
        letters = hetcache.plan_for(target, steps, config, mask=mask, text_len=text_len)
        partition = tokens.partition_from_pixel_mask(
            mask, grid, margin=config.margin, gen_threshold=config.gen_threshold,
            temporal_margin=config.temporal_margin)
        partial = flops.forward_flops(shape, n, plan.partial_row_count(partition, config), text_len, text_kv=False)
        reuse = flops.forward_flops(shape, n, 0, text_len, text_kv=False)
        row["plan"], row["steps"] = letters, len(letters)  # the solver steps it runs
        row["flops_ratio"] = plan.plan_cost(letters, dense, partial, reuse) / (steps * dense)
    elif isinstance(config, FullConfig):
        row["plan"] = "F" * row["steps"]
        row["flops_ratio"] = row["steps"] / steps
    elif isinstance(config, PABConfig):
        timesteps = preview_timesteps(getattr(target, "scheduler", None), steps).tolist()
        row["plan"], row["flops_ratio"] = _pab_plan(config, timesteps, shape, n, text_len)
    else:
        row["note"] = "content-adaptive: decided while denoising"
    row["switch"] = hetcache.expert_switch(target, row["steps"])
    return row


def _pab_plan(config: PABConfig, timesteps: list[float], shape: flops.ModelShape, n: int,
              text_len: int) -> tuple[str, float]:
    from hetcache.methods.base import cross_attention_flops, self_attention_flops

    blocks = shape.num_layers + shape.num_vace_layers
    saved = {"self": blocks * self_attention_flops(shape, n, n),
             "cross": blocks * cross_attention_flops(shape, n, text_len)}
    dense = flops.forward_flops(shape, n, n, text_len, text_kv=True)
    letters, cost = "", 0.0
    for decision in broadcast_steps(config, timesteps):
        letters += "P" if any(decision.values()) else "F"
        cost += dense - sum(saved[kind] for kind, reused in decision.items() if reused)
    return letters, cost / (len(timesteps) * dense)


# ------------------------------------------------------------------------------------------------ CLI bodies
def bench_main(
    prepared: vio.PreparedInputs,
    prompt: str,
    negative_prompt: str,
    methods: str,
    model: str,
    steps: int,
    seed: int,
    guidance: float,
    device: str,
    dtype: str,
    out: Path | str,
    lpips_weights: Path | str | None,
    *,
    method_options: dict[str, dict[str, Any]] | None = None,
    compile: bool = False,
    sources: dict[str, Path | str | None] | None = None,
    guidance_2: float | None = None,
    cache: dict[str, Any] | None = None,
) -> None:
    """`hetcache bench` once its inputs are prepared (`hetcache.cli` does that before importing this module, so
    input errors come at once): check the output folder (`sources`, {role: path}, are the input files no result
    may replace), load the model, run every method, write and print the results. An empty mask is refused."""
    check_prompt(prompt)
    names = parse_methods(methods)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    method_configs(names, steps=steps, options=cache_options(names, method_options, cache))  # before the model
    vio.check_mask_covers(prepared.mask, "compare")
    out = Path(out)
    files.check_output_folder(out, RESULT_FILES, sources)
    if parallel.is_main_process():  # under torchrun rank 0 alone writes there
        note = files.removed_note(files.remove_stale(out), out)
        if note:
            print(f"note: {note}", file=sys.stderr)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    lpips = LPIPS.from_file(lpips_weights, torch_device) if lpips_weights else None  # refused before the model
    _, height, width = prepared.mask.shape
    pipe = load_pipeline(model, torch_device, torch_dtype, height=height, width=width)
    results = run_bench(
        pipe, prepared.video, prepared.mask, prompt, names, steps=steps, seed=seed, guidance=guidance,
        out_dir=out, negative_prompt=negative_prompt, fps=prepared.fps, lpips_weights=lpips_weights, lpips=lpips,
        method_options=method_options, compile=compile, progress=lambda line: print(line, file=sys.stderr),
        guidance_2=guidance_2, cache=cache,
    )
    print(results_markdown(results), end="")
    print("wrote " + ", ".join(str(out / name) for name in RESULT_FILES))


def plan_main(
    model: str,
    steps: int,
    methods: str,
    delta: float | None,
    budget: float | None,
    frames: int | None,
    height: int | None,
    width: int | None,
    mask: Path | str | None,
    *,
    cache_dtype: str | None = None,
) -> None:
    """`hetcache plan`: print each method's step plan and analytic cost for a mask (default: a centred box
    covering a quarter of the model's native clip), where a two-expert pipeline switches experts, and the cache
    estimate of the HetCache methods (`cache_dtype`: its storage dtype), without running the denoiser.
    `delta` / `budget` set the HetCache presets' threshold or FLOPs budget."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if delta is not None and budget is not None:
        raise UserError("--delta and --budget both decide the plan: give one of them")
    if delta is not None and delta < 0:
        raise UserError(f"--delta must be >= 0, got {delta}")
    if budget is not None and not 0 < budget <= 1:
        raise UserError(f"--budget must be a fraction of the dense FLOPs in (0, 1], got {budget}")
    names = parse_methods(methods)
    pixel_mask, note = _plan_mask(model, mask, frames, height, width)
    num_frames, height, width = pixel_mask.shape
    target, text_len = load_for_planning(model, height, width)
    preset = {} if delta is None and budget is None else (
        {"delta": delta, "budget": None} if delta is not None else {"budget": budget})
    overrides = {name: dict(preset) for name in ("hetcache-slow", "hetcache-fast")}
    if cache_dtype is not None:
        for name in names:
            if isinstance(method_config(name, steps=steps), HetCacheConfig):
                overrides.setdefault(name, {})["cache_dtype"] = cache_dtype
    branches = 2 if default_guidance(model) > 1 else 1
    rows = plan_table(target, steps, names, mask=pixel_mask, text_len=text_len, overrides=overrides,
                      branches=branches)
    print(f"{model}: {num_frames} frames at {width}x{height}, {steps} steps; mask: {note}")
    width_name = max(len(r["name"]) for r in rows)
    two_experts = hetcache.expert_switch(target, steps) is not None
    for r in rows:
        cost = "  adaptive" if r["flops_ratio"] is None else f"{r['flops_ratio']:9.3f}"
        switch = f"  switch at step {r['switch']}" if two_experts else ""
        print(f"{r['name']:<{width_name}}  {cost}  {r['plan'] or r['note']}{switch}")
    print("FLOPs as a fraction of full (analytic); F computed, P partly reused, R reused")
    if two_experts:
        boundary = target.config.boundary_ratio * target.scheduler.config.num_train_timesteps
        print(f"experts: transformer runs the steps at t >= {boundary:g}, transformer_2 from the switch step "
              "(counted in each row's solver steps; its first step is F)")
    for r in rows:
        if r["memory"] is not None:
            print(f"memory: {r['name']}: {r['memory'].describe()} at {branches} CFG branch{'es' * (branches > 1)}")


def _plan_mask(model: str, mask: Path | str | None, frames: int | None, height: int | None,
               width: int | None) -> tuple[torch.Tensor, str]:
    if mask is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prepared = vio.prepare_inputs(mask, mask, height=height, width=width, frames=frames,
                                          max_area=largest_area(model))
        return torch.from_numpy(prepared.mask), str(mask)
    native = native_size(model)
    frames, height, width = frames or native[0], height or native[1], width or native[2]
    for name, value, step in (("height", height, 16), ("width", width, 16)):
        if value < step or value % step:
            raise UserError(f"{name} {value} is not a positive multiple of {step}: use e.g. 480 or 832")
    if frames < 1 or (frames - 1) % 4:
        raise UserError(f"frame count {frames} is not of the form 4k+1: use e.g. 81")
    if frames > MAX_FRAMES_ROPE:
        raise UserError(f"{frames} frames are more than the {MAX_FRAMES_ROPE} Wan's rotary table covers: use fewer")
    vio.check_area(height, width, largest_area(model))
    box = torch.zeros(frames, height, width, dtype=torch.bool)
    box[:, height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return box, "a centred box covering a quarter of the frame (pass --mask for your own)"
