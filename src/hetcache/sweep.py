"""Pareto sweeps: every method over a grid of its own knob, on one or more clips, against one `full` per clip.

A sweep is a list of `Point`s (a method and the config options it sets, `method.field=value` for any field of the
method's config) run on a list of `SweepClip`s. `run_sweep` runs `full` once per clip, then every point on every
clip from the same initial latents (`hetcache.runner`), scores each output against that clip's `full` output, and
writes results.json/.csv/.md and pareto.png: one curve per method, the mean over clips of the per-frame PSNR inside
the mask against the analytic FLOPs share (and, in a second panel, against the measured speedup).

Resumable: every run is stored as runs/<clip>/<label>-<digest>.json, keyed by everything that decides its output
(the sweep's settings, the clip's frames and mask, the method and its whole config), and `full`'s frames as .npy
next to it. A second sweep with the same settings reads what exists and runs the rest; a new knob or value makes
new keys, so grids can grow without rerunning what was done. `grid_points` builds the points from the default
grids (`DEFAULT_GRIDS`) or the user's (`method.field=v1,v2,...`, several fields of a method crossed).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import hetcache
from hetcache import files
from hetcache import video as vio
from hetcache.bench import csv_table, flag_notes
from hetcache.config import PRESET_FAMILY
from hetcache.errors import UserError
from hetcache.methods import (
    check_method_name,
    inference_steps,
    method_flag,
    short_flag,
    unavailable_reason,
)
from hetcache.metrics import BAND_PX, FIDELITY_KEYS, LPIPS, fidelity
from hetcache.options import over_config
from hetcache.pipeline import (
    check_prompt,
    load_pipeline,
    native_limits,
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
    fit_scheduler,
    initial_latents,
    method_configs,
    run_method,
    timing_note,
)

SCHEMA = "hetcache-sweep/1"
RUN_SCHEMA = "hetcache-sweep-run/1"
RESULT_FILES = ("results.json", "results.csv", "results.md", "pareto.png")
RUNS_DIR = "runs"
DEFAULT_METHODS = ("fewer-steps", "hetcache", "teacache", "pab", "adacache", "fastcache-style", "diffusers-fbc",
                   "diffusers-magcache", "cache-dit")
# Each method's own knob, over values that span about 0.15-0.75 of dense FLOPs where the method can (measured on
# the proxy at 20 steps on the driving clip, docs/BENCHMARKS.md; HetCache's shares on four clips in
# docs/sweep/four_clips_results.md and docs/PLANS.md). HetCache: budgets in the presets' family, which buy fewer
# solver steps where PARTIAL steps cannot go lower (docs/PLANS.md). PAB only skips attention (above 0.38);
# diffusers' FirstBlockCache and MagCache run the VACE blocks every step (above about 0.5).
DEFAULT_GRIDS: dict[str, tuple[dict[str, Any], ...]] = {
    "fewer-steps": tuple({"steps_fraction": f} for f in (0.15, 0.25, 0.35, 0.5, 0.75)),
    "hetcache": tuple({"budget": b, **PRESET_FAMILY} for b in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7)),
    "teacache": tuple({"delta": d} for d in (0.04, 0.06, 0.1, 0.2, 1.0)),
    "pab": tuple({"self_attention_range": s, "cross_attention_range": 3 * s, "timestep_window": w}
                 for s, w in ((2, (100.0, 800.0)), (2, (0.0, 1000.0)), (4, (0.0, 1000.0)), (20, (0.0, 1000.0)))),
    "adacache": tuple({"codebook_scale": c} for c in (0.4, 0.5, 1.0, 2.0, 8.0)),
    "fastcache-style": tuple({"max_change": c} for c in (0.035, 0.04, 0.05, 0.07, 0.1)),
    "diffusers-fbc": tuple({"threshold": t} for t in (0.05, 0.1, 0.2, 0.4)),
    "diffusers-magcache": ({"threshold": 0.06}, {"threshold": 0.12}, {"threshold": 0.24},
                           {"threshold": 1.0, "max_skip_steps": 6}),
    "cache-dit": tuple({"residual_diff_threshold": t} for t in (0.04, 0.08, 0.16, 0.32)),
}
# Means over clips reported for each point (results.csv columns after the point's identity).
MEANS = ("flops_ratio", "speedup", "denoise_s", *FIDELITY_KEYS)


# ------------------------------------------------------------------------------------------------ points
@dataclass(frozen=True)
class Point:
    """One configuration of one method: the method's name and the config options that differ from its defaults."""

    method: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """e.g. "teacache delta=0.05", or the bare name without options."""
        settings = " ".join(f"{key}={_text(value)}" for key, value in self.options)
        return f"{self.method} {settings}".strip()

    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_text(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _frozen(value: Any) -> Any:
    """A hashable copy of an option value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def grid_points(
    methods: Sequence[str] = DEFAULT_METHODS,
    grids: dict[str, dict[str, list[Any]]] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    config_files: dict[str, dict[str, Any]] | None = None,
) -> list[Point]:
    """The points of a sweep: for each method its grid (the user's, from `grids` {method: {field: [values]}},
    fields crossed, replacing the default; else DEFAULT_GRIDS), with `method_options` {method: {field: value}}
    set at every point. A field in both is refused; so is a grid or option for a method not swept.
    `config_files` ({method: options}, `--config`) lie under both (`options.over_config`)."""
    grids, method_options, config_files = grids or {}, method_options or {}, config_files or {}
    names = list(dict.fromkeys(check_method_name(m) for m in methods if m != REFERENCE))
    for what, given in (("--grid", grids), ("--method-option", method_options), ("--config", config_files)):
        stray = sorted(set(given) - set(names))
        if stray:
            raise UserError(f"{what} for {stray[0]}, which is not among the swept methods: add it to --methods")
    points = []
    for name in names:
        fixed = method_options.get(name, {})
        if name in grids:
            fields = list(grids[name])
            grid = [dict(zip(fields, values)) for values in itertools.product(*(grids[name][f] for f in fields))]
        else:
            grid = [dict(options) for options in DEFAULT_GRIDS.get(name, ({},))]
        both = sorted(set(fixed) & {key for options in grid for key in options})
        if both:
            raise UserError(f"{name}.{both[0]} is set by --method-option and swept by the grid: give it once")
        for options in grid:
            merged = {**fixed, **options}
            if name in config_files:
                merged = over_config(config_files[name], merged)
            points.append(Point(name, tuple((key, _frozen(merged[key])) for key in sorted(merged))))
    return list(dict.fromkeys(points))


# ------------------------------------------------------------------------------------------------ clips
@dataclass
class SweepClip:
    """One clip of a sweep, fitted to the model: frames uint8 [F, H, W, 3], mask bool [F, H, W], its prompt."""

    id: str
    video: np.ndarray
    mask: np.ndarray
    prompt: str
    source: str

    def digest(self) -> str:
        """A hash of the frames, the mask and the prompt: stored runs of a changed clip do not count."""
        sha = hashlib.sha1()
        for part in (self.video, self.mask):
            sha.update(str(part.shape).encode())
            sha.update(np.ascontiguousarray(part).tobytes())
        sha.update(self.prompt.encode())
        return sha.hexdigest()[:16]


@dataclass
class SweepSettings:
    """What every run of a sweep shares (part of every run's key)."""

    model: str
    steps: int
    seed: int = 0
    guidance: float = 5.0
    negative_prompt: str = ""
    compile: bool = False
    band_px: int = BAND_PX
    lpips: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    guidance_2: float | None = None  # a two-expert pipeline's second guidance (None: the same as `guidance`)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._") or "run"


def _clip_dir(out: Path, clip: SweepClip) -> Path:
    safe = _safe(clip.id)
    if safe != clip.id:
        safe = f"{safe}-{hashlib.sha1(clip.id.encode()).hexdigest()[:8]}"
    return out / RUNS_DIR / safe


# ------------------------------------------------------------------------------------------------ running
@dataclass
class _Clip:
    """One clip while it runs: its runs folder, the arguments every run shares (latents among them), and `full`'s
    frames and record (the reference of every score, time and FLOPs share)."""

    clip: SweepClip
    folder: Path
    common: dict[str, Any]
    reference: np.ndarray | None = None
    reference_record: dict[str, Any] | None = None


def run_sweep(
    pipe: Any,
    clips: Sequence[SweepClip],
    points: Sequence[Point],
    settings: SweepSettings,
    out_dir: str | Path,
    *,
    lpips: LPIPS | None = None,
    progress: Callable[[str], None] | None = None,
    show_bar: bool = True,
) -> dict[str, Any]:
    """Run `full` and every point on every clip (stored runs with the same key are read, not rerun), write the
    result files into `out_dir`, and return results.json's content. `progress` gets one line per run."""
    say = progress or (lambda line: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a folder")
    if not clips:
        raise UserError("no clip to sweep")
    configs = [(point.label, point_config(point, settings)) for point in points]  # options checked before any run
    for clip in clips:  # every cache fits, before anything denoises
        check_fit(pipe, configs, *clip.mask.shape, settings.guidance)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [{"method": m, "reason": r} for m in dict.fromkeys(p.method for p in points)
               if (r := unavailable_reason(m)) is not None]
    runnable = [p for p in points if p.method not in {s["method"] for s in skipped}]
    started = {"warm": False}
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    total = len(clips) * (1 + len(runnable))
    with tqdm(total=total, desc="sweep", unit="run", file=sys.stderr, disable=not show_bar) as bar:
        for clip in clips:
            state = _open_clip(pipe, clip, settings, out)
            reference = _reference(pipe, state, settings, started, say)
            bar.update(1)
            runs.append(reference)
            for point in runnable:
                try:
                    record = _point_run(pipe, state, point, settings, lpips, started, say)
                except Exception as error:  # noqa: BLE001 - one failing run must not lose the others
                    hetcache.disable(pipe)
                    failed.append({"clip": clip.id, "label": point.label, "reason": describe_failure(error)})
                    say(f"  {point.label:<44} {failed[-1]['reason']}")
                else:
                    runs.append(record)
                bar.update(1)
            results = _results(settings, clips, points, runs, skipped, failed)
            write_results(out, results)
    return results


def _open_clip(pipe: Any, clip: SweepClip, settings: SweepSettings, out: Path) -> _Clip:
    check_prompt(clip.prompt)
    fit_scheduler(pipe, *clip.mask.shape[1:])
    latents = initial_latents(pipe, *clip.mask.shape, settings.seed)
    common = {"negative_prompt": settings.negative_prompt, "guidance": settings.guidance, "seed": settings.seed,
              "latents": latents, "guidance_2": settings.guidance_2}
    return _Clip(clip, _clip_dir(out, clip), common)


def point_config(point: Point, settings: SweepSettings) -> Any:
    """A fresh config of `point` for the sweep's step count and mode (a run's `prepare` may change its config)."""
    options = {point.method: point.option_dict()} if point.options else None
    return method_configs([point.method], steps=settings.steps, options=options, compile=settings.compile)[0][1]


# Config fields added later, with the default that behaves as their absence did: left out of a run's key at that
# default, so sweeps stored before `max_step_fraction` existed keep matching (fields added before it, such as
# step_fraction or reuse, are in every key since; runs stored before them rerun).
LATER_FIELDS: dict[str, Any] = {"max_step_fraction": None}


def _key(settings: SweepSettings, clip: SweepClip, method: str, config: Any) -> dict[str, Any]:
    shared = dataclasses.asdict(settings)
    if shared["guidance_2"] is None:  # absent, as in the keys of sweeps stored before it existed
        del shared["guidance_2"]
    fields = config.to_dict()
    for name, default in LATER_FIELDS.items():  # absent at their default, as in keys stored before they existed
        if name in fields and fields[name] == default:
            del fields[name]
    return {"settings": shared, "clip": clip.id, "clip_digest": clip.digest(), "method": method, "config": fields}


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stored(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        return None
    if json.loads(json.dumps(record.get("key"), default=str)) != json.loads(json.dumps(key, default=str)):
        return None
    return record


def _warm(pipe: Any, state: _Clip, settings: SweepSettings, started: dict[str, bool]) -> None:
    """Before the first timed run of this sweep: compile the blocks (with `compile`) and make one untimed
    1-step run of the plain pipeline (lazy initialisation)."""
    if started["warm"]:
        return
    hetcache.disable(pipe)
    if settings.compile:
        compile_blocks(pipe)
    run_edit(pipe, state.clip.video, state.clip.mask, state.clip.prompt, steps=WARMUP_STEPS, **state.common)
    started["warm"] = True


def _reference(pipe: Any, state: _Clip, settings: SweepSettings, started: dict[str, bool],
               say: Callable[[str], None]) -> dict[str, Any]:
    """`full` on this clip: stored (record and frames) or run now."""
    config = point_config(Point(REFERENCE), settings)
    key = _key(settings, state.clip, REFERENCE, config)
    path = state.folder / f"{REFERENCE}-{_digest(key)}.json"
    frames_path = path.with_suffix(".npy")
    record = _stored(path, key)
    if record is not None and frames_path.is_file():
        state.reference = np.load(frames_path, allow_pickle=False)
        say(f"{state.clip.id}: {REFERENCE} done earlier")
    else:
        _warm(pipe, state, settings, started)
        done = run_method(pipe, config, state.clip.video, state.clip.mask, state.clip.prompt, settings.steps,
                          state.common, untimed_first=settings.compile)
        state.reference = done.frames
        buffer = io.BytesIO()
        np.save(buffer, done.frames, allow_pickle=False)
        files.write_bytes(frames_path, buffer.getvalue())
        record = _record(key, state, Point(REFERENCE), config, settings.steps, done, reference_time=done.denoise_s,
                         reference_flops=done.stats.flops, settings=settings, lpips=None)
        files.write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
        say(f"{state.clip.id}: {REFERENCE} {done.denoise_s:.2f} s")
    state.reference_record = record
    return record


def _point_run(pipe: Any, state: _Clip, point: Point, settings: SweepSettings, lpips: LPIPS | None,
               started: dict[str, bool], say: Callable[[str], None]) -> dict[str, Any]:
    config = point_config(point, settings)
    key = _key(settings, state.clip, point.method, config)
    path = state.folder / f"{_safe(point.label)}-{_digest(key)}.json"
    record = _stored(path, key)
    if record is not None:
        return record
    _warm(pipe, state, settings, started)
    steps = inference_steps(config, settings.steps)
    done = run_method(pipe, config, state.clip.video, state.clip.mask, state.clip.prompt, steps, state.common,
                      untimed_first=settings.compile)
    reference = state.reference_record
    record = _record(key, state, point, config, steps, done, reference_time=reference["denoise_s"],
                     reference_flops=reference["flops"], settings=settings, lpips=lpips)
    files.write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")
    say(_progress_line(record))
    return record


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _record(key: dict[str, Any], state: _Clip, point: Point, config: Any, steps: int, done: Any, *,
            reference_time: float, reference_flops: float | None, settings: SweepSettings,
            lpips: LPIPS | None) -> dict[str, Any]:
    stats = done.stats
    observed = stats.dense_flops > 0
    scores = fidelity(done.frames, state.reference, state.clip.mask, band_px=settings.band_px, lpips=lpips)
    speedup = reference_time / done.denoise_s if done.denoise_s > 0 else None
    flops_ratio = stats.flops / reference_flops if observed and reference_flops else None
    caveat = timing_note(speedup, flops_ratio)
    return {
        "schema": RUN_SCHEMA, "key": key, "clip": state.clip.id, "method": point.method, "label": point.label,
        "options": point.option_dict(), "steps": len(stats.plan) or steps, "plan": stats.plan,
        "denoise_s": done.denoise_s, "speedup": speedup, "flops": stats.flops if observed else None,
        "flops_ratio": flops_ratio,
        "cache_bytes": stats.cache_bytes,
        **{k: _finite(v) for k, v in scores.items()},
        "identical": bool(np.array_equal(done.frames, state.reference)), "flag": method_flag(point.method),
        "notes": list(stats.notes) + ([caveat] if caveat else []),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _progress_line(record: dict[str, Any]) -> str:
    psnr = "identical" if record["identical"] else _fmt(record["psnr_mask_per_frame"], "{:.2f} dB")
    return (f"  {record['label']:<44} {record['denoise_s']:7.2f} s  FLOPs {_fmt(record['flops_ratio'], '{:.2f}')}  "
            f"PSNR mask {psnr}  plan {record['plan'] or '-'}")


# ------------------------------------------------------------------------------------------------ results
def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def aggregate(runs: Sequence[dict[str, Any]], points: Sequence[Point], clips: Sequence[str]) -> list[dict[str, Any]]:
    """One row per point (`full` first): the number of clips it ran on, and the mean over those clips of MEANS.
    `complete` says whether every clip has the point and a per-frame PSNR in the mask (what the plot needs)."""
    rows = []
    for point in [Point(REFERENCE), *points]:
        mine = [r for r in runs if r["label"] == point.label and r["method"] == point.method]
        if not mine:
            continue
        psnr = [r["psnr_mask_per_frame"] for r in mine]
        rows.append({
            "method": point.method, "label": point.label, "options": point.option_dict(), "clips": len(mine),
            "complete": len(mine) == len(clips) and (point.method == REFERENCE or None not in psnr),
            "identical_clips": sum(r["identical"] for r in mine), "flag": method_flag(point.method),
            "steps": _mean([r["steps"] for r in mine]),
            **{column: _mean([r[column] for r in mine]) for column in MEANS},
        })
    return rows


def _results(settings: SweepSettings, clips: Sequence[SweepClip], points: Sequence[Point], runs: list[dict],
             skipped: list[dict], failed: list[dict]) -> dict[str, Any]:
    import diffusers
    import torch

    clip_ids = [c.id for c in clips]
    return {
        "schema": SCHEMA,
        "settings": {
            **dataclasses.asdict(settings), "reference": REFERENCE,
            "psnr": "per-frame mean inside the mask (psnr_mask_per_frame) in the plot and tables; pooled in the json",
            "warmup": f"one {WARMUP_STEPS}-step run of the plain pipeline before the first timed run"
                      + ("; every run once more, untimed, before its timed run (compilation)" if settings.compile
                         else ""),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": {"hetcache": hetcache.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
        },
        "clips": [{"id": c.id, "source": c.source, "prompt": c.prompt, "frames": int(c.mask.shape[0]),
                   "height": int(c.mask.shape[1]), "width": int(c.mask.shape[2]),
                   "mask_share": float(c.mask.mean())} for c in clips],
        "points": aggregate(runs, points, clip_ids),
        "runs": [{k: v for k, v in r.items() if k not in ("schema", "key")} for r in runs],
        "skipped": skipped,
        "failed": failed,
    }


CSV_COLUMNS = ("method", "label", "clips", "complete", "identical_clips", "flag", "steps", *MEANS)


def write_results(out: Path, results: dict[str, Any]) -> list[str]:
    """results.json, results.csv (one row per point), results.md and pareto.png; returns the plot's labels."""
    files.write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    files.write_text(out / "results.csv", csv_table(results["points"], CSV_COLUMNS))
    files.write_text(out / "results.md", results_markdown(results))
    return write_pareto(out / "pareto.png", results)


def results_markdown(results: dict[str, Any]) -> str:
    """The sweep as Markdown: settings, the clips, one row per point (means over clips), the per-clip PSNRs."""
    s, clips = results["settings"], results["clips"]
    mode = "compiled (reference and every method)" if s["compile"] else "eager"
    guidance = f"guidance {s['guidance']:g}" + (f" (second expert {s['guidance_2']:g})"
                                                 if s.get("guidance_2") is not None else "")
    lines = [
        "# hetcache sweep", "",
        (f"{len(clips)} clip(s), model {s['model']}, {s['steps']} steps, {guidance}, seed {s['seed']}, "
        f"{s['device']}/{s['dtype']}, {mode}. Every run starts from the same initial latents as its clip's `full`."),
        "",
        ("Fidelity against `full` on the same clip: PSNR (dB) inside the mask as the mean over frames of each "
        "frame's PSNR (the pooled PSNR is the `pooled` column), SSIM and LPIPS inside the mask. FLOPs: analytic "
        "share of `full`'s at the requested step count; speedup: `full`'s denoising time over the run's (same "
        "clip, same mode; runs resumed from an earlier sweep keep their own times). Means over clips."), "",
        "| clip | source | frames | size | mask share | prompt |", "|---|---|---:|---|---:|---|",
    ]
    lines += [f"| `{c['id']}` | {c['source']} | {c['frames']} | {c['width']}x{c['height']} | "
              f"{c['mask_share']:.3f} | {c['prompt']} |" for c in clips]
    lines += ["", ("| method | setting | clips | steps | FLOPs | speedup | PSNR mask | pooled | SSIM mask | LPIPS mask "
              "| flag |"), "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in _sorted_points(results["points"]):
        setting = row["label"][len(row["method"]):].strip() or "-"
        identical = row["identical_clips"]
        psnr = "=" if identical == row["clips"] else _fmt(row["psnr_mask_per_frame"], "{:.2f}")
        if 0 < identical < row["clips"]:
            psnr += f" ({row['clips'] - identical} clips; {identical} identical)"
        lines.append(
            f"| `{row['method']}` | {setting} | {row['clips']} | {_fmt(row['steps'], '{:g}')} | "
            f"{_fmt(row['flops_ratio'], '{:.3f}')} | {_fmt(row['speedup'], '{:.2f}x')} | {psnr} | "
            f"{_fmt(row['psnr_mask'], '{:.2f}')} | {_fmt(row['ssim_mask'], '{:.4f}')} | "
            f"{_fmt(row['lpips_mask'], '{:.4f}')} | {short_flag(row['flag']) or '-'} |")
    if len(clips) > 1:
        lines += ["", "Per clip: PSNR mask (FLOPs share).", "",
                  "| point | " + " | ".join(f"`{c['id']}`" for c in clips) + " |",
                  "|---|" + "---:|" * len(clips)]
        by_clip = {(r["clip"], r["label"]): r for r in results["runs"]}
        for row in _sorted_points(results["points"]):
            if row["method"] == REFERENCE:
                continue
            cells = []
            for c in clips:
                run = by_clip.get((c["id"], row["label"]))
                if run is None:
                    cells.append("-")
                    continue
                psnr = "=" if run["identical"] else _fmt(run["psnr_mask_per_frame"], "{:.2f}")
                cells.append(f"{psnr} ({_fmt(run['flops_ratio'], '{:.2f}')})")
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    flags = flag_notes([(row["method"], row["flag"]) for row in results["points"]])
    if flags:
        lines += ["", "Flags:", ""] + flags
    if results["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- `{x['method']}`: {x['reason']}" for x in results["skipped"]]
    if results["failed"]:
        lines += ["", "Failed runs (run again by the next sweep):", ""]
        lines += [f"- `{x['clip']}` {x['label']}: {x['reason']}" for x in results["failed"]]
    notes = sorted({f"- {r['label']} on `{r['clip']}`: {n}" for r in results["runs"] for n in r["notes"]})
    if notes:
        lines += ["", "Notes:", ""] + notes
    return "\n".join(lines) + "\n"


def _sorted_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`full` first, then each method in the sweep's order, its points by FLOPs share."""
    order = {method: index for index, method in enumerate(dict.fromkeys(row["method"] for row in points))}

    def key(row: dict[str, Any]) -> tuple:
        share = row["flops_ratio"]
        return (row["method"] != REFERENCE, order[row["method"]], share if share is not None else math.inf)

    return sorted(points, key=key)


def write_pareto(path: Path, results: dict[str, Any]) -> list[str]:
    """Two panels, one curve per method through its complete points: PSNR inside the mask (per-frame mean, mean
    over clips) against the analytic FLOPs share (left) and the measured speedup (right). Flagged methods are
    dashed, their flag in the legend. Returns the legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s = results["settings"]
    rows = [r for r in results["points"] if r["complete"] and r["method"] != REFERENCE]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120, sharey=True)
    labels = []
    for index, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method and r["psnr_mask_per_frame"] is not None]
        flag = short_flag(mine[0]["flag"]) if mine else ""
        label = method + (f" [{flag}]" if flag else "")
        style = {"color": plt.get_cmap("tab10")(index % 10), "linestyle": "--" if flag else "-", "marker": "o",
                     "markersize": 4, "linewidth": 1.5}
        # Both panels join the points in the order of the method's FLOPs share (its setting), so the speedup
        # panel shows how timing follows the same sequence of settings.
        mine.sort(key=lambda r: (math.inf if r["flops_ratio"] is None else r["flops_ratio"], r["speedup"] or 0.0))
        drawn = False
        for ax, x_key in zip(axes, ("flops_ratio", "speedup")):
            curve = [(r[x_key], r["psnr_mask_per_frame"]) for r in mine if r[x_key] is not None]
            if curve:
                ax.plot(*zip(*curve), label=label, **style)
                drawn = True
        if drawn:
            labels.append(label)
    axes[0].set_xlabel(f"analytic FLOPs share of {REFERENCE} at {s['steps']} steps")
    axes[1].set_xlabel(f"measured speedup over {REFERENCE} (denoising loop, "
                       f"{'compiled' if s['compile'] else 'eager'}, {s['device']})")
    axes[0].set_ylabel(f"PSNR to {REFERENCE} inside the mask (dB, per-frame mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    clips = len(results["clips"])
    fig.suptitle(f"hetcache sweep: {s['model']}, {s['steps']} steps, mean over {clips} clip{'s' * (clips > 1)}",
                 fontsize=11)
    if labels:
        handles = {}
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(name, handle)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    files.save_figure(fig, path)
    plt.close(fig)
    return labels


# ------------------------------------------------------------------------------------------------ CLI body
def load_clips(source: Path | str, mask: Path | str | None, box: str | None, prompt: str | None, model: str,
               layout: str, frames: int | None, height: int | None, width: int | None,
               limit: int | None = None) -> tuple[list[SweepClip], list[str]]:
    """The clips to sweep, fitted to the model: one video with its mask (or box) and prompt, or the items of a
    dataset folder in `layout` (`prompt` then fills in for items without one). Returns (clips, notes)."""
    from hetcache.evaluate import load_item, scan_dataset
    from hetcache.pipeline import prepare_for_model

    source = Path(source)
    if mask is not None or box is not None:
        if prompt is None:
            raise UserError("--prompt is missing: describe what the masked region should show")
        check_prompt(prompt)
        prepared = prepare_for_model(model, source, mask, box, frames, height, width)
        vio.check_mask_covers(prepared.mask, "sweep")
        return [SweepClip(source.stem or str(source), prepared.video, prepared.mask, prompt, str(source))], []
    if source.is_file() and layout != "vpbench":
        raise UserError(f"{source} is a video: give its --mask (or --box), or pass a dataset folder")
    found = scan_dataset(source, layout, default_prompt=prompt)
    clips, notes = [], list(found.notes)
    for item in found.items[:limit]:
        try:
            loaded = load_item(item, frames, height, width, native_limits(model))
        except UserError as error:
            notes.append(f"{item.id}: left out: {error}")
            continue
        clips.append(SweepClip(item.id, loaded.video, loaded.mask, item.prompt, str(item.video)))
    if not clips:
        raise UserError(f"no item of {source} could be loaded: " + "; ".join(notes))
    return clips, notes


def prepare_output(out: Path, names: Sequence[str], source: Any, mask: Any, box: Any, notes: list[str | None]) -> None:
    """Before any model loads: `out` can take `names` without replacing an input, leftovers of killed runs are
    removed, and the notes so far are printed."""
    files.check_output_folder(out, names, {"input video": source if mask or box else None, "mask": mask})
    notes.append(files.removed_note(files.remove_stale(out, recursive=True), out))
    for note in filter(None, notes):
        tqdm.write(f"note: {note}", file=sys.stderr)


def sweep_main(
    source: Path | str,
    mask: Path | str | None,
    box: str | None,
    prompt: str | None,
    *,
    out: Path | str,
    methods: str,
    grids: dict[str, dict[str, list[Any]]],
    method_options: dict[str, dict[str, Any]],
    model: str,
    layout: str = "folder",
    steps: int,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    guidance: float = 5.0,
    negative_prompt: str = "",
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    lpips_weights: Path | str | None = None,
    limit: int | None = None,
    guidance_2: float | None = None,
    cache: dict[str, Any] | None = None,
    config_files: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`hetcache sweep`: check everything, load the clips and the model, run the sweep, print the report.
    `cache` ({"cache_device", "cache_dtype"}) is set at every point of the HetCache methods; `config_files`
    ({method: options}, `--config`) under every point of the method's grid."""
    names = [n.strip() for n in methods.split(",") if n.strip()]
    names = list(DEFAULT_METHODS) if names in ([], ["all"]) else names
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    points = grid_points(names, grids, cache_options(names, method_options, cache), config_files)
    for point in points:  # option errors before anything loads
        point_config(point, SweepSettings(model=model, steps=steps, compile=compile))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    clips, notes = load_clips(source, mask, box, prompt, model, layout, frames, height, width, limit)
    prepare_output(out, RESULT_FILES, source, mask, box, notes)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    _, first_height, first_width = clips[0].mask.shape
    lpips = LPIPS.from_file(lpips_weights, torch_device) if lpips_weights else None  # refused before the model
    pipe = load_pipeline(model, torch_device, torch_dtype, height=first_height, width=first_width)
    settings = SweepSettings(model=model, steps=steps, seed=seed, guidance=guidance, negative_prompt=negative_prompt,
                             compile=compile, lpips=str(lpips_weights) if lpips_weights else None,
                             device=torch_device.type, dtype=str(torch_dtype).removeprefix("torch."),
                             guidance_2=guidance_2)
    results = run_sweep(pipe, clips, points, settings, out, lpips=lpips,
                        progress=lambda line: tqdm.write(line, file=sys.stderr))
    print(results_markdown(results), end="")
    print("wrote " + ", ".join(str(out / name) for name in RESULT_FILES) + f" and {out / RUNS_DIR}/")
    return results

