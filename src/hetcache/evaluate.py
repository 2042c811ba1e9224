"""Evaluation over a dataset: every method on every (video, mask, prompt) item, scored against the ground truth
where the dataset has one and against `full`'s output always, with resumable per-item results and aggregates.

Each item runs like one `hetcache bench` (the same machinery, `hetcache.runner`): every method from the same
inputs, seed and initial latents, `full` first. Scores use the raw model output: pooled and per-frame PSNR and
SSIM over the frame, inside the mask and on the margin band, LPIPS over the frame and inside the mask when
weights are given, a temporal consistency measure inside the mask, and VFID and KID over each group's clips when
I3D weights are given. Layouts, files and fields: docs/EVAL.md.

An inpainting item (one with ground truth) never shows the model what it must restore: its masked pixels are
set to mid-grey before the pipeline sees them (VACE encodes the masked pixels as "reactive" frames).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import hetcache
from hetcache import bench, files
from hetcache import video as vio
from hetcache.errors import UserError
from hetcache.methods import (
    inference_steps,
    method_flag,
    short_flag,
    unavailable_reason,
)
from hetcache.metrics import (
    BAND_PX,
    FIDELITY_KEYS,
    I3D,
    LPIPS,
    VFID_CLIP_FRAMES,
    VFID_CLIP_STRIDE,
    VFID_SIZE,
    fidelity,
    kid,
    psnr,
    temporal_consistency,
    vfid,
)
from hetcache.pipeline import (
    HIDDEN_GREY,
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
    describe_failure,
    fit_scheduler,
    initial_latents,
    method_configs,
    run_method,
)

SCHEMA = "hetcache-eval/1"
ITEM_SCHEMA = "hetcache-eval-item/1"
LAYOUTS = ("vace-benchmark", "vpbench", "folder")
GREY = HIDDEN_GREY  # what an inpainting item's masked pixels become before the model sees them
ALIGNMENT_PSNR_DB = 30.0  # below this, outside the mask, the ground truth does not match the input: a note says so
ITEMS_DIR = "items"
ITEM_FILE = "result.json"
FEATURES_FILE = "i3d.npz"
GROUND_TRUTH = "ground_truth"  # the ground truth's key in i3d.npz

METRICS = (*FIDELITY_KEYS, "temporal_mask", "flicker_mask")
REFERENCES = ("gt", "full")
SCORES = tuple(f"{ref}_{metric}" for ref in REFERENCES for metric in METRICS)
ITEM_COLUMNS = (
    "item", "task", "method", "steps", "plan", "denoise_s", "speedup", "flops_ratio", "identical_to_full", "flag",
    *SCORES,
)
# Set-level distances over a group's clip features (`metrics.vfid`, `metrics.kid`).
DISTANCES = ("vfid", "kid")
AGGREGATE_COLUMNS = (
    "group", "method", "items", "gt_items", "identical_items", "denoise_s", "speedup", "flops_ratio", "flag", *SCORES,
    *(f"{ref}_{d}" for d in DISTANCES for ref in REFERENCES),
)
OUTPUT_FILES = ("per_item.json", "per_item.csv", "per_item.md", "aggregate.json", "aggregate.csv", "aggregate.md")

_VPBENCH_DEFAULT_CSV = "our_video_edit.csv"
_VPBENCH_PROMPTS = {"Edited_video_caption": "editing", "video_inpainting_prompt": "inpainting"}
_VACE_METADATA = "metadata.jsonl"


# ------------------------------------------------------------------------------------------------ datasets
@dataclass(frozen=True)
class Item:
    """One (video, mask, prompt) of a dataset, as found on disk; `problem` says why it cannot run."""

    id: str
    task: str
    prompt: str | None
    video: Path | None
    mask: Path | None
    ground_truth: Path | None = None  # may be `video` itself (VPBench inpainting: the clip is its own truth)
    mask_id: int | None = None  # VPBench: the object id selected in an .npz mask of object ids
    frame_range: tuple[int, int] | None = None  # VPBench: source frames [start, end)
    problem: str | None = None


@dataclass
class Dataset:
    items: list[Item]
    notes: list[str] = field(default_factory=list)


def scan_dataset(dataset: str | os.PathLike, layout: str, default_prompt: str | None = None) -> Dataset:
    """The items of a dataset in `layout` (one of LAYOUTS), sorted; UserError when none can be found.
    `default_prompt` is the prompt of items that have none."""
    path = Path(dataset)
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if not path.exists():
        raise UserError(f"dataset not found: {path}: check the path")
    if layout == "vpbench":
        found = _scan_vpbench(path, default_prompt)
    elif not path.is_dir():
        raise UserError(f"dataset {path} is a file: the {layout} layout is a folder")
    else:
        found = (_scan_vace if layout == "vace-benchmark" else _scan_folder)(path, default_prompt)
    if not found.items:
        raise UserError(f"no items found in {path} for layout {layout}: see docs/EVAL.md for the expected files")
    return found


class _BadPrompt(Exception):
    """A prompt file that cannot be read as text: the item fails, the others run."""


def _read_prompt(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise _BadPrompt(f"{path.name} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except OSError as error:
        raise _BadPrompt(f"cannot read {path.name}: {error.strerror or error}") from None
    return text or None


def _prompt_or_problem(path: Path, default_prompt: str | None) -> tuple[str | None, str | None]:
    """(prompt, None), or (None, why the item cannot run) when its prompt file is unreadable."""
    try:
        return _read_prompt(path) or default_prompt, None
    except _BadPrompt as error:
        return None, str(error)


def _scan_folder(root: Path, default_prompt: str | None) -> Dataset:
    """ROOT/<item>/video.mp4, mask.mp4 (or mask.png), prompt.txt, optional ground_truth.mp4."""
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        video = folder / "video.mp4"
        if not video.is_file():
            continue
        mask = next((folder / n for n in ("mask.mp4", "mask.png") if (folder / n).is_file()), None)
        truth = folder / "ground_truth.mp4"
        prompt, unreadable = _prompt_or_problem(folder / "prompt.txt", default_prompt)
        problem = ("no mask.mp4 or mask.png" if mask is None else unreadable or
                   ("no prompt.txt (or it is empty)" if prompt is None else None))
        items.append(Item(folder.name, "inpainting" if truth.is_file() else "editing", prompt, video, mask,
                          truth if truth.is_file() else None, problem=problem))
    return Dataset(items)


def _scan_vace(root: Path, default_prompt: str | None) -> Dataset:
    """Every [<id>_]src_video.mp4 under ROOT with its [<id>_]src_mask.mp4, optional [<id>_]raw_video.mp4 or
    [<id>_]ori_video.mp4 (ground truth), and a prompt from [<id>_]prompt.txt or ROOT/metadata.jsonl."""
    metadata = _vace_metadata(root / _VACE_METADATA)
    items, unmasked, with_references = [], 0, 0
    for video in sorted(root.rglob("*src_video.mp4")):
        prefix = video.name[: -len("src_video.mp4")]
        if prefix and not prefix.endswith("_"):
            continue
        folder, stem = video.parent, prefix[:-1]
        relative = folder.relative_to(root).as_posix()
        item_id = "/".join(part for part in (relative, stem) if part and part != ".") or root.name
        meta = metadata.get(stem) or metadata.get(video.relative_to(root).as_posix()) or metadata.get(item_id) or {}
        mask = folder / f"{prefix}src_mask.mp4"
        if not mask.is_file():
            unmasked += 1
            continue
        if meta.get("src_ref_images"):
            with_references += 1
            continue
        truth = next((folder / f"{prefix}{n}" for n in ("raw_video.mp4", "ori_video.mp4")
                      if (folder / f"{prefix}{n}").is_file()), None)
        prompt, problem = _prompt_or_problem(folder / f"{prefix}prompt.txt", None)
        prompt = prompt or str(meta.get("prompt") or "").strip() or default_prompt
        if problem is None and prompt is None:
            problem = f"no {prefix}prompt.txt and no prompt in {_VACE_METADATA}"
        items.append(Item(item_id, str(meta.get("task") or folder.name), prompt, video, mask, truth, problem=problem))
    notes = []
    if unmasked:
        notes.append(f"{unmasked} src_video file(s) without a src_mask (not masked editing) left out")
    if with_references:
        notes.append(f"{with_references} item(s) with reference images (src_ref_images) left out: not supported")
    return Dataset(items, notes)


def _read_text(path: Path) -> str:
    """A dataset's own index file (CSV, metadata.jsonl) as text: one UserError when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None


def _vace_metadata(path: Path) -> dict[str, dict]:
    """metadata.jsonl rows keyed by their `id` and by their `src_video` path (both optional)."""
    if not path.is_file():
        return {}
    rows: dict[str, dict] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {number} is not JSON: one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object: one object per line")
        for key in (row.get("id"), row.get("src_video")):
            if key:
                rows[str(key)] = row
    return rows


def _scan_vpbench(path: Path, default_prompt: str | None) -> Dataset:
    """VPBench: a CSV (default ROOT/our_video_edit.csv) of clips of ROOT's raw videos and .npz object-id masks."""
    table, root = (path, path.parent) if path.is_file() else (path / _VPBENCH_DEFAULT_CSV, path)
    if not table.is_file():
        raise UserError(f"no {table.name} in {root}: pass the VPBench folder or one of its CSV files")
    rows = list(csv.DictReader(io.StringIO(_read_text(table), newline="")))
    columns = set(rows[0]) if rows else set()
    prompt_column = next((c for c in _VPBENCH_PROMPTS if c in columns), None)
    missing = {"path", "mask_id", "start_frame", "end_frame"} - columns
    if missing or prompt_column is None:
        wanted = sorted(missing) + ([] if prompt_column else [" or ".join(_VPBENCH_PROMPTS)])
        raise UserError(f"{table} lacks column(s) {', '.join(wanted)}: pass a VPBench CSV")
    task = _VPBENCH_PROMPTS[prompt_column]
    items, seen = [], set()
    for number, row in enumerate(rows):
        name = row["path"].strip()
        base = name.split(".")[0]
        source = "videovo" if name.endswith(".0.mp4") else "pexels"
        folder = root / "videovo" / "raw_video" / base[:-3] if source == "videovo" else (
            root / "pexels" / "pexels" / "raw_video" / base[:9])
        video, mask = folder / name, root / "video_inpainting" / source / base / "all_masks.npz"
        item_id = base if base not in seen else f"{base}-{number}"
        seen.add(item_id)
        prompt = (row.get(prompt_column) or "").strip() or default_prompt
        try:
            mask_id, frame_range = int(row["mask_id"]), (int(row["start_frame"]), int(row["end_frame"]))
        except ValueError:
            mask_id, frame_range = None, None
        problem = ("mask_id, start_frame or end_frame is not an integer" if mask_id is None else
                   f"video not found: {video}" if not video.is_file() else
                   f"mask not found: {mask}" if not mask.is_file() else
                   f"empty {prompt_column}" if prompt is None else None)
        items.append(Item(item_id, task, prompt, video, mask, video if task == "inpainting" else None,
                          mask_id=mask_id, frame_range=frame_range, problem=problem))
    return Dataset(items)


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadedItem:
    """An item's frames at the model size: what the model sees, the mask, and the ground truth (or None)."""

    video: np.ndarray  # uint8 [F, H, W, 3], masked pixels grey when there is ground truth
    mask: np.ndarray  # bool [F, H, W]
    ground_truth: np.ndarray | None
    notes: list[str]


def load_item(
    item: Item,
    frames: int | None,
    height: int | None,
    width: int | None,
    limits: tuple[int, int] = (vio.DEFAULT_AREA, vio.MAX_FRAMES),
) -> LoadedItem:
    """Read, sample and fit an item's video, mask and ground truth to one model size (as `hetcache edit` does),
    within `limits`: the model's (pixel area, most frames), from `native_limits`."""
    area, max_frames = limits
    if item.problem is not None:
        raise UserError(item.problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the same facts come back as notes
        if item.mask_id is not None:
            video, mask, notes = _load_vpbench_clip(item, frames, height, width, area, max_frames)
        else:
            prepared = vio.prepare_inputs(
                item.video, item.mask, height=height, width=width, frames=frames, area=area, max_frames=max_frames
            )
            video, mask, notes = prepared.video, prepared.mask, list(prepared.notes)
        truth = None
        if item.ground_truth is not None and item.ground_truth == item.video:
            truth = video
        elif item.ground_truth is not None:
            count, h, w = mask.shape
            truth = vio.prepare_inputs(item.ground_truth, item.mask, height=h, width=w, frames=count).video
    vio.check_mask_covers(mask, "evaluate")
    if truth is not None:
        outside = psnr(video, truth, ~mask)
        if outside is not None and outside < ALIGNMENT_PSNR_DB:
            notes.append(f"the ground truth differs from the input outside the mask ({outside:.1f} dB PSNR): "
                         "check that the two videos are aligned")
        video = np.where(mask[..., None], np.uint8(GREY), video)
    return LoadedItem(video, mask, truth, notes)


def _load_vpbench_clip(item: Item, frames: int | None, height: int | None, width: int | None, area: int,
                       max_frames: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    start, end = item.frame_range
    source = vio.read_frames(item.video).frames[start:end]
    try:
        with np.load(item.mask) as archive:
            ids = archive["arr_0"][start:end]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read mask {item.mask}: {error}: expected an .npz with arr_0 [frames, H, W]") from None
    if ids.ndim != 3:
        raise UserError(f"mask {item.mask} holds shape {ids.shape}: expected object ids [frames, height, width]")
    count = vio.choose_frame_count(min(len(source), len(ids)), frames, max_frames=max_frames)
    h, w = vio._model_size(*source.shape[1:3], height, width, area)
    mask = vio.fit_frames(ids[:count] == item.mask_id, h, w)
    if not mask.any():
        raise UserError(f"object {item.mask_id} is absent from frames {start}..{start + count - 1}: the mask is "
                        "empty: nothing to evaluate")
    return vio.fit_frames(source[:count], h, w), mask, []


# ------------------------------------------------------------------------------------------------ scoring
def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def score(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray, *, band_px: int = BAND_PX,
          lpips: LPIPS | None = None) -> dict[str, float | None]:
    """Every METRICS value of `pred` against `reference` (None where undefined, e.g. PSNR of identical pixels)."""
    scores = {key: _finite(value) for key, value in fidelity(pred, reference, mask, band_px=band_px,
                                                              lpips=lpips).items()}
    temporal = temporal_consistency(pred, reference, mask)
    return {**scores, "temporal_mask": temporal["temporal"], "flicker_mask": temporal["flicker"]}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# ------------------------------------------------------------------------------------------------ one item
def _item_dir(out: Path, item_id: str) -> Path:
    """A folder name for an item id: the id itself when it is a plain name, else a cleaned name plus a hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._") or "item"
    if safe != item_id:
        safe = f"{safe}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"
    return out / ITEMS_DIR / safe


def fingerprint(item: Item, digests: dict[Path, str] | None = None) -> str:
    """A hash of everything an item's result depends on besides the settings: the bytes of its video, mask and
    ground truth, its prompt, task, object id and frame range. `digests` memoises file hashes within one run
    (VPBench items share their videos)."""
    digests = {} if digests is None else digests
    sha = hashlib.sha256()
    for path in (item.video, item.mask, item.ground_truth):
        if path is not None and path not in digests:
            digests[path] = _file_digest(path)
        sha.update(f"{digests.get(path)}\n".encode())
    sha.update(json.dumps([item.prompt, item.task, item.mask_id, item.frame_range]).encode())
    return sha.hexdigest()[:16]


def _file_digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None  # missing or unreadable: the item fails on loading, and runs again once the file is there


def completed_record(folder: Path, key: dict[str, Any], names: Sequence[str],
                     item_fingerprint: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(the item's stored result, None) when it was made from the same dataset, with the same settings, from
    the same files and prompt (`item_fingerprint`) and covers every method in `names` (a method that failed does
    not count: it runs again); else (None, why it runs again), the reason None when nothing was stored."""
    try:
        record = json.loads((folder / ITEM_FILE).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(record, dict) or record.get("schema") != ITEM_SCHEMA:
        return None, "its stored result has another format"
    stored = record.get("key") or {}
    if stored.get("dataset") != key.get("dataset"):
        return None, f"its stored result is from another dataset ({stored.get('dataset')})"
    if stored != key:
        changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        return None, f"its stored result was made with other settings ({', '.join(changed)})"
    if record.get("fingerprint") != item_fingerprint:
        return None, "its files or prompt changed since its stored result"
    covered = {row["method"] for row in record["rows"]}
    covered |= {s["method"] for s in record["skipped"] if not s["failed"]}
    if not set(names) <= covered:
        return None, f"its stored result lacks {', '.join(sorted(set(names) - covered))}"
    if key["i3d"] and not (folder / FEATURES_FILE).is_file():
        return None, f"its {FEATURES_FILE} is missing"
    return record, None


@dataclass
class _Context:
    """What every item of one evaluation shares."""

    key: dict[str, Any]
    configs: list[tuple[str, Any]]
    steps: int
    seed: int
    guidance: float
    band_px: int
    lpips: LPIPS | None
    i3d: I3D | None
    say: Callable[[str], None]


def evaluate_item(pipe: Any, item: Item, loaded: LoadedItem, ctx: _Context, folder: Path,
                  item_fingerprint: str | None = None) -> dict[str, Any]:
    """Run every method on one item, score it, write its result.json (and i3d.npz) under `item_fingerprint`
    (`fingerprint`); returns the record."""
    num_frames, height, width = loaded.mask.shape
    latents = initial_latents(pipe, num_frames, height, width, ctx.seed)
    # Inpainting items were greyed by `load_item`; editing items go in as they are.
    common = dict(negative_prompt="", guidance=ctx.guidance, seed=ctx.seed, latents=latents, hide_masked=False,
                  guidance_2=ctx.key.get("guidance_2"))
    rows, skipped, outputs, features = [], [], {}, {}
    if ctx.i3d is not None and loaded.ground_truth is not None:
        features[GROUND_TRUTH] = ctx.i3d(loaded.ground_truth)
    reference_time = reference_flops = None
    for name, config in ctx.configs:
        reason = unavailable_reason(name)
        if reason is not None:
            skipped.append({"method": name, "reason": reason, "failed": False})
            continue
        run_steps = inference_steps(config, ctx.steps)
        try:
            done = run_method(pipe, config, loaded.video, loaded.mask, item.prompt, run_steps, common)
        except Exception as error:  # noqa: BLE001 - one failing method must not lose the others' results
            hetcache.disable(pipe)
            if name == REFERENCE:
                raise
            reason = describe_failure(error)
            skipped.append({"method": name, "reason": reason, "failed": True})
            ctx.say(f"  {name:<20} {reason}")
            continue
        frames, denoise, stats = done.frames, done.denoise_s, done.stats
        observed = stats.dense_flops > 0
        if name == REFERENCE:
            reference_time, reference_flops = denoise, (stats.flops if observed else None)
        outputs[name] = frames
        identical = bool(np.array_equal(frames, outputs[REFERENCE]))
        gt = (score(frames, loaded.ground_truth, loaded.mask, band_px=ctx.band_px, lpips=ctx.lpips)
              if loaded.ground_truth is not None else dict.fromkeys(METRICS))
        vs_full = (dict.fromkeys(METRICS) if name == REFERENCE else
                   score(frames, outputs[REFERENCE], loaded.mask, band_px=ctx.band_px, lpips=ctx.lpips))
        row = {
            "item": item.id, "task": item.task, "method": name, "steps": run_steps, "plan": stats.plan,
            "denoise_s": denoise, "speedup": reference_time / denoise if denoise > 0 else None,
            "flops_ratio": stats.flops / reference_flops if observed and reference_flops else None,
            "identical_to_full": identical, "flag": method_flag(name),
            **{f"gt_{k}": v for k, v in gt.items()}, **{f"full_{k}": v for k, v in vs_full.items()},
        }
        rows.append(row)
        if ctx.i3d is not None:
            features[name] = ctx.i3d(frames)
        ctx.say(_progress_line(row))
    record = {
        "schema": ITEM_SCHEMA, "key": ctx.key, "fingerprint": item_fingerprint, "id": item.id, "task": item.task,
        "prompt": item.prompt,
        "frames": num_frames, "height": height, "width": width, "ground_truth": loaded.ground_truth is not None,
        "rows": rows, "skipped": skipped, "notes": loaded.notes,
    }
    if ctx.i3d is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **features)
        files.write_bytes(folder / FEATURES_FILE, buffer.getvalue())
    files.write_bytes(folder / ITEM_FILE, (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
    return record


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _progress_line(row: dict[str, Any]) -> str:
    gt = (f"GT PSNR mask {_fmt(row['gt_psnr_mask_per_frame'], '{:.2f}')}" if row["gt_psnr_frame"] is not None
          else "no GT")
    full = ("= full" if row["identical_to_full"] else
            f"vs full PSNR mask {_fmt(row['full_psnr_mask_per_frame'], '{:.2f}')}")
    return (f"  {row['method']:<20} {row['denoise_s']:8.3f} s  {_fmt(row['speedup'], 'x{:.2f}'):>6}  "
            f"FLOPs {_fmt(row['flops_ratio'], '{:.2f}')}  {gt}  {full}  plan {row['plan'] or '-'}")


# ------------------------------------------------------------------------------------------------ tables
def aggregate(records: Sequence[dict[str, Any]], names: Sequence[str],
              features: dict[str, dict[str, np.ndarray]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (group, method): means over items of every per-item number (items where it is null left
    out), counts, and the set-level VFIDs and KIDs from `features` (item id -> name -> [clips, dim]). Groups:
    "all", then one per task when the dataset has several. Returns (rows, notes on distances that could not be
    made)."""
    tasks = sorted({r["task"] for r in records})
    groups = [("all", list(records))] + ([(t, [r for r in records if r["task"] == t]) for t in tasks]
                                         if len(tasks) > 1 else [])
    rows, notes = [], []
    for group, members in groups:
        for name in names:
            per_item = [row for record in members for row in record["rows"] if row["method"] == name]
            if not per_item:
                continue
            truth = {record["id"] for record in members if record["ground_truth"]}
            with_truth = [r["item"] for r in per_item if r["item"] in truth]
            row = {
                "group": group, "method": name, "items": len(per_item), "gt_items": len(with_truth),
                "identical_items": sum(r["identical_to_full"] for r in per_item),
                **{c: _mean([r[c] for r in per_item]) for c in ("denoise_s", "speedup", "flops_ratio")},
                "flag": method_flag(name), **{c: _mean([r[c] for r in per_item]) for c in SCORES},
                **{f"{ref}_{d}": None for d in DISTANCES for ref in REFERENCES},
            }
            if features is not None:
                ids = [r["item"] for r in per_item]
                for distance in DISTANCES:
                    row[f"gt_{distance}"] = _set_distance(features, with_truth, GROUND_TRUTH, name, distance,
                                                          f"{group}: gt_{distance}", notes)
                    if name != REFERENCE:
                        row[f"full_{distance}"] = _set_distance(features, ids, REFERENCE, name, distance,
                                                                f"{group}: full_{distance}", notes)
            rows.append(row)
    return rows, list(dict.fromkeys(notes))


def _set_distance(features: dict[str, dict[str, np.ndarray]], ids: Sequence[str], reference: str, name: str,
                  distance: str, label: str, notes: list[str]) -> float | None:
    sets = [[features[i][key] for i in ids if i in features and key in features[i]] for key in (reference, name)]
    if not all(sets):
        return None
    measure = {"vfid": vfid, "kid": kid}[distance]
    try:
        return measure(np.concatenate(sets[0]), np.concatenate(sets[1]))
    except ValueError as error:
        notes.append(f"{label}: not computed: {error} ({len(ids)} items)")
        return None


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return buffer.getvalue()


def _markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" if pattern == "{}" else "---:" for _, _, pattern in columns) + "|"]
    for row in rows:
        cells = [(f"`{row[key]}`" if row[key] else "-") if key == "plan" else (short_flag(row[key]) or "-")
                 if key == "flag" else _fmt(row[key], pattern) for key, _, pattern in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_ITEM_MD = (
    ("item", "item", "{}"), ("task", "task", "{}"), ("method", "method", "{}"), ("plan", "plan", "{}"),
    ("speedup", "speedup", "{:.2f}x"), ("flops_ratio", "FLOPs", "{:.2f}"),
    ("gt_psnr_mask_per_frame", "GT PSNR mask", "{:.2f}"), ("gt_ssim_mask", "GT SSIM mask", "{:.4f}"),
    ("gt_lpips_mask", "GT LPIPS mask", "{:.4f}"), ("gt_temporal_mask", "GT temporal", "{:.2f}"),
    ("full_psnr_mask_per_frame", "full PSNR mask", "{:.2f}"), ("full_ssim_mask", "full SSIM mask", "{:.4f}"),
    ("full_psnr_band_per_frame", "full PSNR band", "{:.2f}"), ("full_temporal_mask", "full temporal", "{:.2f}"),
    ("flag", "flag", "{}"),
)
_AGGREGATE_MD = (
    ("group", "group", "{}"), ("method", "method", "{}"), ("items", "items", "{}"), ("speedup", "speedup", "{:.2f}x"),
    ("flops_ratio", "FLOPs", "{:.2f}"), ("gt_psnr_mask_per_frame", "GT PSNR mask", "{:.2f}"),
    ("gt_ssim_mask", "GT SSIM mask", "{:.4f}"), ("gt_psnr_frame_per_frame", "GT PSNR frame", "{:.2f}"),
    ("gt_lpips", "GT LPIPS", "{:.4f}"), ("gt_lpips_mask", "GT LPIPS mask", "{:.4f}"),
    ("gt_temporal_mask", "GT temporal", "{:.2f}"), ("gt_vfid", "GT VFID", "{:.3f}"), ("gt_kid", "GT KID", "{:.4f}"),
    ("full_psnr_mask_per_frame", "full PSNR mask", "{:.2f}"), ("full_ssim_mask", "full SSIM mask", "{:.4f}"),
    ("full_psnr_band_per_frame", "full PSNR band", "{:.2f}"), ("full_vfid", "full VFID", "{:.3f}"),
    ("full_kid", "full KID", "{:.4f}"), ("flag", "flag", "{}"),
)


def _header(settings: dict[str, Any], title: str) -> list[str]:
    s = settings
    return [
        f"# hetcache eval: {title}", "",
        f"{s['dataset']} ({s['layout']}), {s['steps']} steps, guidance {s['guidance']:g}"
        + ("" if s.get("guidance_2") is None else f" (second expert {s['guidance_2']:g})") + f", seed {s['seed']}, "
        f"{s['device']}/{s['dtype']}, model {s['model']}.", "",
        "Scores of each method's raw output: `GT` against the ground truth (inpainting items only), `full` against "
        "the `full` method's output. PSNR (dB): the mean over frames of each frame's PSNR (pooled PSNRs are in the "
        "CSV and JSON); SSIM; LPIPS over the frame and inside the mask; temporal = mean |frame difference - "
        "reference's frame difference| inside the mask, in 8-bit levels; VFID and KID over the group's clips "
        "(docs/EVAL.md). Flags: docs/RESULTS_SCHEMA.md. CSV and JSON hold every column.", "",
    ]


def write_tables(out: Path, settings: dict[str, Any], records: Sequence[dict[str, Any]], failed: list[dict],
                 names: Sequence[str], dataset_notes: list[str]) -> dict[str, Any]:
    """per_item.{json,csv,md} and aggregate.{json,csv,md}; returns aggregate.json's content."""
    features = _load_features(out, records) if settings["i3d"] else None
    rows, vfid_notes = aggregate(records, names, features)
    item_rows = [row for record in records for row in record["rows"]]
    items = [{k: v for k, v in record.items() if k not in ("schema", "key", "fingerprint")} for record in records]
    per_item = {"schema": SCHEMA, "settings": settings, "items": items, "failed": failed, "notes": dataset_notes}
    summary = {"schema": SCHEMA, "settings": settings, "rows": rows, "failed": failed,
               "notes": dataset_notes + vfid_notes}
    files.write_bytes(out / "per_item.json", (json.dumps(per_item, indent=2, allow_nan=False) + "\n").encode())
    files.write_bytes(out / "aggregate.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    files.write_bytes(out / "per_item.csv", _csv(item_rows, ITEM_COLUMNS).encode())
    files.write_bytes(out / "aggregate.csv", _csv(rows, AGGREGATE_COLUMNS).encode())
    tail = ([""] + ["Failed items:", ""] + [f"- `{f['item']}`: {f['reason']}" for f in failed] if failed else [])
    tail += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]] if summary["notes"] else []
    item_md = _header(settings, "per item") + _markdown_table(item_rows, _ITEM_MD) + tail
    aggregate_md = (_header(settings, "aggregate") + _markdown_table(rows, _AGGREGATE_MD)
                    + ["", "Means over items; VFID and KID over the clips of all items of the group."] + tail)
    files.write_bytes(out / "per_item.md", ("\n".join(item_md) + "\n").encode())
    files.write_bytes(out / "aggregate.md", ("\n".join(aggregate_md) + "\n").encode())
    return summary


def aggregate_markdown(out: str | os.PathLike) -> str:
    """The aggregate report as written (for printing)."""
    return (Path(out) / "aggregate.md").read_text()


def _load_features(out: Path, records: Sequence[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    features = {}
    for record in records:
        path = _item_dir(out, record["id"]) / FEATURES_FILE
        if path.is_file():
            with np.load(path) as archive:
                features[record["id"]] = {name: archive[name] for name in archive.files}
    return features


# ------------------------------------------------------------------------------------------------ CLI body
def eval_main(
    dataset: Path | str,
    layout: str,
    methods: str,
    model: str,
    steps: int,
    out: Path | str,
    frames: int | None,
    height: int | None,
    width: int | None,
    seed: int,
    guidance: float,
    device: str,
    dtype: str,
    lpips_weights: Path | str | None,
    i3d_weights: Path | str | None,
    limit: int | None,
    method_options: dict[str, dict[str, Any]] | None = None,
    guidance_2: float | None = None,
    cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`hetcache eval`: every method on every item of a dataset; resumes finished items; writes per-item and
    aggregate tables into `out`. `method_options` ({method: {option: value}}) go to the methods' configs, `cache`
    ({"cache_device", "cache_dtype"}) to every HetCache method's; `guidance_2` is a two-expert pipeline's second
    guidance. An item whose HetCache caches fit neither the device nor the host fails before it denoises.
    Returns aggregate.json's content."""
    names = bench.parse_methods(methods)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    method_options = cache_options(names, method_options, cache)
    configs = method_configs(names, steps=steps, options=method_options)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    found = scan_dataset(dataset, layout)
    items = found.items[:limit]
    files.check_output_folder(out, OUTPUT_FILES)
    note = files.removed_note(files.remove_stale(out, recursive=True), out)
    if note:
        _say(f"note: {note}")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    lpips = LPIPS.from_file(lpips_weights, torch_device) if lpips_weights else None
    i3d = I3D.from_file(i3d_weights, torch_device) if i3d_weights else None
    key = {
        "dataset": str(Path(dataset).resolve()), "layout": layout, "model": model, "steps": steps, "frames": frames,
        "height": height, "width": width,
        "seed": seed, "guidance": guidance, "guidance_2": guidance_2, "device": torch_device.type,
        "dtype": str(torch_dtype).removeprefix("torch."), "band_px": BAND_PX,
        "lpips": str(lpips_weights) if lpips_weights else None, "i3d": str(i3d_weights) if i3d_weights else None,
        "method_options": method_options or {},
    }
    settings = _settings(dataset, key, names, limit, torch_device)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(key, configs, steps, seed, guidance, BAND_PX, lpips, i3d, _say)
    pipe = None
    records, failed = [], []
    digests: dict[Path, str] = {}
    for item in tqdm(items, desc="eval", unit="item", file=sys.stderr):
        folder = _item_dir(out, item.id)
        item_fingerprint = fingerprint(item, digests)
        done, why = completed_record(folder, key, names, item_fingerprint)
        if done is not None:
            _say(f"{item.id}: done earlier, skipped")
            records.append(_restrict(done, names))
            continue
        if why is not None:
            _say(f"{item.id}: {why}: running it again")
        try:
            loaded = load_item(item, frames, height, width, native_limits(model))
        except UserError as error:
            failed.append({"item": item.id, "reason": str(error)})
            _say(f"{item.id}: failed: {error}")
            continue
        _say(f"{item.id} ({item.task}, {'ground truth' if loaded.ground_truth is not None else 'no ground truth'})")
        if pipe is None:
            pipe = _load(model, torch_device, torch_dtype, loaded, item.prompt, guidance_2)
        try:
            check_fit(pipe, configs, *loaded.mask.shape, guidance)
        except UserError as error:
            failed.append({"item": item.id, "reason": str(error)})
            _say(f"{item.id}: failed: {error}")
            continue
        fit_scheduler(pipe, *loaded.mask.shape[1:])
        try:
            records.append(evaluate_item(pipe, item, loaded, ctx, folder, item_fingerprint))
        except (UserError, RuntimeError, ValueError) as error:
            failed.append({"item": item.id, "reason": f"{REFERENCE} failed: {' '.join(str(error).split())}"})
            _say(f"{item.id}: {failed[-1]['reason']}")
        write_tables(out, settings, records, failed, names, found.notes)
    summary = write_tables(out, settings, records, failed, names, found.notes)
    print(aggregate_markdown(out), end="")
    print("wrote " + ", ".join(str(out / name) for name in OUTPUT_FILES))
    return summary


def _say(line: str) -> None:
    """One progress line on stderr, above the progress bar."""
    tqdm.write(line, file=sys.stderr)


def _restrict(record: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A stored record limited to the methods asked for now."""
    return {**record, "rows": [r for r in record["rows"] if r["method"] in names],
            "skipped": [s for s in record["skipped"] if s["method"] in names]}


def _load(model: str, device: torch.device, dtype: torch.dtype, first: LoadedItem, prompt: str,
          guidance_2: float | None) -> Any:
    """Load the pipeline and make one untimed 1-step run (lazy initialisation, as `hetcache bench` does; a
    `guidance_2` for a pipeline with one expert ends the evaluation here)."""
    _, height, width = first.mask.shape
    pipe = load_pipeline(model, device, dtype, height=height, width=width)
    run_edit(pipe, first.video, first.mask, prompt, steps=WARMUP_STEPS, hide_masked=False, guidance_2=guidance_2)
    return pipe


def _settings(dataset: Any, key: dict[str, Any], names: Sequence[str], limit: int | None,
              device: torch.device) -> dict[str, Any]:
    import diffusers

    return {
        "dataset": str(dataset), **key, "device": str(device), "methods": list(names), "limit": limit,
        "reference": REFERENCE, "grey_fill": GREY,
        "vfid_clips": {"frames": VFID_CLIP_FRAMES, "stride": VFID_CLIP_STRIDE, "size": VFID_SIZE},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"hetcache": hetcache.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }

