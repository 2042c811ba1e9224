"""Heterogeneity analysis: what the step plan decides, and where the generative tokens look, step by step.

For one edit with the stock pipeline (no cache), at every denoising step:
(a) the plan signal from the timestep modulations (`hetcache.plan`; no model run needed): the step distance,
    HetCache's accumulator, its thresholds delta and kappa * delta, HetCache's decision and TeaCache's (the same
    signal, delta and guards with the kappa = 1 rule: reuse below delta, compute above);
(b) the last main block's self-attention from the generative tokens of the first latent frame that has any
    (frame 0 for ordinary masks) to every token: softmax over all keys, averaged over heads and those queries,
    kept for up to 5 latent frames spread over the clip;
(c) the attention mass the generative queries (all of them, at most `session.SCORE_QUERIES` evenly spaced) put on
    the generative, margin and context tokens.
(b) and (c) come from a diffusers hook on the last block's `attn1` that recomputes the queries and keys the way
the block does (projections, RMS norms, RoPE), on the "cond" CFG branch only. Outputs: analysis.json,
analysis.png (rows: sampled steps, columns: frames; steps TeaCache would skip are marked) and
mass_by_class.png (mass per class and the plan signal against the step).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

import hetcache
from hetcache import compat, files, plan, select, tokens
from hetcache import video as vio
from hetcache.api import experts_of
from hetcache.config import HetCacheConfig
from hetcache.core import call_argument
from hetcache.errors import UserError
from hetcache.methods import method_config
from hetcache.pipeline import (
    MAX_SEQUENCE_LENGTH,
    check_prompt,
    experts,
    load_pipeline,
    prepare_for_model,
    preview_timesteps,
    resolve_device,
    resolve_dtype,
    run_edit,
)
from hetcache.plan import resolve_plan
from hetcache.session import SCORE_QUERIES
from hetcache.sparse import RowRope, qkv_projections

SCHEMA = "hetcache-analysis/1"
HOOK_NAME = "hetcache-analysis"
BRANCH = "cond"
PRESETS = ("hetcache-slow", "hetcache-fast")
CLASSES = ("generative", "margin", "context")
MAX_FRAMES = 5  # latent frames kept per heat-map row
MAX_ROWS = 10  # steps shown in analysis.png
OUTPUT_FILES = ("analysis.json", "analysis.png", "mass_by_class.png")


# ------------------------------------------------------------------------------------------------ (a) plan signal
def accumulated(distances: Sequence[float], letters: str) -> list[float]:
    """The accumulator of `plan.plan_from_distances` at every step, after adding d_t and before the decision's
    reset: A_t = d_t + (A_{t-1} if step t-1 reused, else 0)."""
    values, total = [], 0.0
    for distance, letter in zip(distances, letters):
        total += distance
        values.append(total)
        if letter != "R":
            total = 0.0
    return values


def plan_signal(pipe: Any, steps: int, config: HetCacheConfig, partition: tokens.TokenPartition) -> dict[str, Any]:
    """The step plan of `config` over all `steps` steps of `pipe` (the analysed run takes every step, so a config
    that would run fewer solver steps is planned at every step here) and the signal behind it, from the timestep
    modulations alone. TeaCache's decisions use the same distances, delta, warm-up and reuse cap with kappa = 1
    and a FULL after every reuse run; None when the plan is a fixed string (there is no delta)."""
    transformer = pipe.transformer
    text_len = min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer.model_max_length))
    timesteps = preview_timesteps(pipe.scheduler, steps)
    pair = experts_of(pipe)  # two experts: each step's signal from the expert that runs it
    switch = None if pair is None else pair.switch(timesteps)
    letters, delta, notes = resolve_plan(transformer, config, partition, text_len, timesteps=timesteps,
                                         num_steps=steps, experts=pair)
    coefficients = plan.TEACACHE_WAN21_COEFFICIENTS.get(plan.model_family(transformer.config) or "")
    distances = plan.model_distances(transformer, timesteps, pair)
    teacache = None
    if delta is not None:
        teacache = plan.plan_from_distances(distances, delta, kappa=1.0, warmup_steps=config.warmup_steps,
                                            max_reuse=config.max_reuse, refresh_every=1,
                                            full_at=() if switch is None else (switch,))
    return {
        "switch": switch,
        "timesteps": [float(t) for t in timesteps],
        "coefficients": "TeaCache Wan2.1 " + plan.model_family(transformer.config) if coefficients else "identity",
        "distance": distances,
        "delta": delta,
        "kappa": config.kappa,
        "hetcache": letters,
        "accumulated": accumulated(distances, letters),
        "teacache": teacache,
        "teacache_accumulated": None if teacache is None else accumulated(distances, teacache),
        "teacache_skips": [] if teacache is None else [i for i, k in enumerate(teacache) if k == "R"],
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------ (b, c) attention
def query_key_value(attn: torch.nn.Module, hidden_states: torch.Tensor,
                    rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Self-attention queries and keys (after RMS norm and RoPE) and values of a Wan block's `attn1`, each
    [B, N, heads, head_dim], computed as diffusers' `WanAttnProcessor` does."""
    query, key, value = qkv_projections(attn, hidden_states)
    rope = RowRope.from_rotary_emb(rotary_emb)
    query = rope.apply(attn.norm_q(query).unflatten(2, (attn.heads, -1)))
    key = rope.apply(attn.norm_k(key).unflatten(2, (attn.heads, -1)))
    return query, key, value.unflatten(2, (attn.heads, -1))


def mean_attention(queries: torch.Tensor, keys: torch.Tensor, max_queries: int | None = None) -> torch.Tensor:
    """The attention distribution over all N keys, averaged over heads and queries: float32 [N], sums to 1.
    queries [H, n, Dh] (n >= 1), keys [H, N, Dh]; with `max_queries`, an evenly spaced subset of the queries."""
    used = queries.shape[1] if max_queries is None else min(queries.shape[1], max_queries)
    scores = select.interaction_scores(queries, keys, max_queries=max_queries)
    return scores * (used / queries.shape[1]) / used


class _Branch(BaseState):
    def reset(self) -> None:
        pass


class AttentionProbe(ModelHook):
    """Records (b) and (c) at every call of the block it is attached to, on the "cond" branch only.

    Stateful only so that diffusers' `cache_context` tells it the branch; the records survive resets.
    """

    _is_stateful = True

    def __init__(self, partition: tokens.TokenPartition, query_frame: int) -> None:
        super().__init__()
        self.state_manager = StateManager(_Branch)
        self.labels = partition.labels().long()
        self.generative = partition.generative
        frames, rows, cols = partition.grid
        per_frame = rows * cols
        first = self.generative[(self.generative >= query_frame * per_frame)
                                & (self.generative < (query_frame + 1) * per_frame)]
        self.frame_queries = first
        self.records: list[dict[str, torch.Tensor]] = []

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        branch = compat.context_name(self.state_manager)
        if branch is not None and branch != BRANCH:
            return args, kwargs
        hidden_states = call_argument(type(module).forward, args, kwargs, "hidden_states")
        rotary_emb = call_argument(type(module).forward, args, kwargs, "rotary_emb")
        with torch.no_grad():
            query, key, _ = query_key_value(module, hidden_states, rotary_emb)
            queries, keys = query[0].transpose(0, 1).float(), key[0].transpose(0, 1).float()
            frame_map = mean_attention(queries.index_select(1, self.frame_queries.to(queries.device)), keys)
            overall = mean_attention(queries.index_select(1, self.generative.to(queries.device)), keys,
                                     max_queries=SCORE_QUERIES)
            mass = torch.zeros(len(CLASSES), device=keys.device).index_add_(0, self.labels.to(keys.device), overall)
        self.records.append({"map": frame_map.cpu(), "mass": mass.cpu()})
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def attach_probe(transformer: torch.nn.Module, partition: tokens.TokenPartition, query_frame: int) -> AttentionProbe:
    """Register an AttentionProbe on the last main block's self-attention."""
    probe = AttentionProbe(partition, query_frame)
    HookRegistry.check_if_exists_or_initialize(transformer.blocks[-1].attn1).register_hook(probe, HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return probe


def detach_probe(transformer: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer.blocks[-1].attn1).remove_hook(HOOK_NAME, recurse=False)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


# ------------------------------------------------------------------------------------------------ one analysis
def sampled(count: int, most: int) -> list[int]:
    """Up to `most` indices of range(count), evenly spread, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(count, most))})


def analyze(pipe: Any, video: np.ndarray, mask: np.ndarray, prompt: str, *, steps: int, config: HetCacheConfig,
            seed: int = 0, guidance: float = 5.0, negative_prompt: str = "",
            guidance_2: float | None = None) -> dict[str, Any]:
    """Run the stock pipeline on one edit with a probe on the last block of each expert; returns the analysis.json
    content (two experts: each step's record says which expert ran it, `plan.switch` where they switch)."""
    num_frames, height, width = mask.shape
    _, patch_h, patch_w = pipe.transformer.config.patch_size
    grid = ((num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
            height // (pipe.vae_scale_factor_spatial * patch_h), width // (pipe.vae_scale_factor_spatial * patch_w))
    partition = tokens.partition_from_pixel_mask(
        torch.from_numpy(mask), grid, margin=config.margin, gen_threshold=config.gen_threshold,
        temporal_margin=config.temporal_margin)
    labels = partition.labels().reshape(grid)
    with_queries = [f for f in range(grid[0]) if bool((labels[f] == tokens.GENERATIVE).any())]
    if not with_queries:
        raise UserError("the mask covers no token: nothing to analyse (draw a larger mask)")
    query_frame = with_queries[0]
    signal = plan_signal(pipe, steps, dataclasses.replace(config, step_fraction=1.0), partition)

    hetcache.disable(pipe)
    probes = [attach_probe(expert, partition, query_frame) for expert in experts(pipe)]
    try:
        run_edit(pipe, video, mask, prompt, steps=steps, guidance=guidance, seed=seed, negative_prompt=negative_prompt,
                 guidance_2=guidance_2)
    finally:
        for expert in experts(pipe):
            detach_probe(expert)
    expert_of_step = [index for index, probe in enumerate(probes) for _ in probe.records]  # in the order they ran
    seen = [record for probe in probes for record in probe.records]
    if len(seen) != steps:
        raise RuntimeError(f"the probes saw {len(seen)} '{BRANCH}' calls for {steps} steps")

    frames = sampled(grid[0], MAX_FRAMES)
    counts = partition.counts()
    records = []
    for index, record in enumerate(seen):
        maps = record["map"].reshape(grid)[frames]
        mass = dict(zip(CLASSES, record["mass"].tolist()))
        frame_mass = torch.zeros(len(CLASSES)).index_add_(0, labels.flatten().long(), record["map"].float())
        records.append({
            "step": index,
            "expert": expert_of_step[index],
            "timestep": signal["timesteps"][index],
            "hetcache": signal["hetcache"][index],
            "teacache": None if signal["teacache"] is None else signal["teacache"][index],
            "mass": mass,
            "query_frame_mass": dict(zip(CLASSES, frame_mass.tolist())),
            "maps": [[[_short(v) for v in row] for row in frame] for frame in maps.tolist()],
        })
    return {
        "schema": SCHEMA,
        "grid": list(grid),
        "tokens": counts,
        "labels": labels[frames].tolist(),
        "query_frame": query_frame,
        "queries": int(probes[0].frame_queries.numel()),
        "experts": len(probes),
        "mass_queries": min(counts["generative"], SCORE_QUERIES),
        "sampled_frames": frames,
        "branch": BRANCH,
        "plan": {k: _json_list(v) if k in ("distance", "accumulated", "teacache_accumulated") else v
                 for k, v in signal.items()},
        "steps": records,
    }


def _short(value: float) -> float:
    """Four significant digits: enough for a heat map, and analysis.json stays small."""
    return float(f"{value:.4g}")


def _json_list(values: Sequence[float] | None) -> list[float | None] | None:
    """Infinite values (step 0's distance) as null."""
    return None if values is None else [v if math.isfinite(v) else None for v in values]


# ------------------------------------------------------------------------------------------------ figures
_COLOURS = {"generative": "#d62728", "margin": "#ff7f0e", "context": "#1f77b4"}
_LETTER_COLOURS = {"F": "black", "P": "#ff7f0e", "R": "#2ca02c"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_heatmaps(path: Path, analysis: dict[str, Any]) -> None:
    """analysis.png: one row per sampled step, one column per sampled latent frame; attention as a multiple of
    the uniform value 1/N on one shared colour scale, generative tokens outlined; TeaCache's skipped steps in red."""
    plt = _pyplot()
    from matplotlib.colors import Normalize

    steps = analysis["steps"]
    rows = sampled(len(steps), MAX_ROWS)
    frames = analysis["sampled_frames"]
    total = analysis["tokens"]["total"]
    _, height, width = analysis["grid"]
    shown = {(r, c): np.asarray(steps[r]["maps"][c]) * total for r in rows for c in range(len(frames))}
    norm = Normalize(0.0, max(float(m.max()) for m in shown.values()))
    cell = 2.2
    fig, axes = plt.subplots(len(rows), len(frames), squeeze=False, dpi=110, layout="constrained",
                             figsize=(cell * len(frames) + 2.4, (cell * height / width + 0.15) * len(rows) + 0.6))
    image = None
    for i, r in enumerate(rows):
        skip = steps[r]["teacache"] == "R"
        for c, frame in enumerate(frames):
            ax = axes[i][c]
            image = ax.imshow(shown[(r, c)], cmap="magma", norm=norm, interpolation="nearest")
            generative = np.asarray(analysis["labels"][c]) == tokens.GENERATIVE
            if 0 < generative.sum() < generative.size:
                ax.contour(generative.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red" if skip else "black")
                spine.set_linewidth(2.5 if skip else 0.5)
            if i == 0:
                queries = " (queries)" if frame == analysis["query_frame"] else ""
                ax.set_title(f"latent frame {frame}{queries}", fontsize=8)
        label = f"step {r}\nHetCache {steps[r]['hetcache']}" + ("\nTeaCache skips" if skip else "")
        axes[i][0].set_ylabel(label, fontsize=8, color="red" if skip else "black", rotation=0, ha="right",
                              va="center")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention x N (1 = uniform)")
    fig.suptitle(f"Last-block attention of the generative tokens of latent frame {analysis['query_frame']} "
                 f"({analysis['branch']} branch)\ncyan: generative tokens; red: steps TeaCache would skip",
                 fontsize=9)
    files.save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)


def write_mass_plot(path: Path, analysis: dict[str, Any]) -> None:
    """mass_by_class.png: top, the generative queries' attention mass per token class against the step (dashed:
    the class's share of tokens, what uniform attention would give); bottom, the plan signal."""
    plt = _pyplot()
    steps = analysis["steps"]
    signal = analysis["plan"]
    x = np.arange(len(steps))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), dpi=110)
    for ax in (top, bottom):
        for s in signal["teacache_skips"]:
            ax.axvspan(s - 0.5, s + 0.5, color="0.88", zorder=0)
        if signal.get("switch") is not None:  # two experts: the second runs from here
            ax.axvline(signal["switch"] - 0.5, color="purple", lw=1, ls="-.", label="expert switch")
    for name in CLASSES:
        top.plot(x, [s["mass"][name] for s in steps], marker="o", ms=3, color=_COLOURS[name], label=name)
        share = analysis["tokens"][name] / analysis["tokens"]["total"]
        top.axhline(share, color=_COLOURS[name], ls="--", lw=0.8)
    top.set_ylabel("attention mass of generative queries")
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper right")
    top.set_title("Where generative queries look (last block, cond); dashed: share of tokens; grey: TeaCache skips",
                  fontsize=9)
    values = [np.nan if v is None else v for v in signal["accumulated"]]
    bottom.plot(x, values, color="0.4", lw=1, label="HetCache accumulator")
    for i, letter in enumerate(signal["hetcache"]):
        if not np.isnan(values[i]):
            bottom.scatter(i, values[i], color=_LETTER_COLOURS[letter], s=22, zorder=3)
        bottom.annotate(letter, (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7,
                        color=_LETTER_COLOURS[letter])
    if signal["teacache_accumulated"] is not None:
        tea = [np.nan if v is None else v for v in signal["teacache_accumulated"]]
        bottom.plot(x, tea, color="#2ca02c", lw=1, ls=":", label="TeaCache accumulator (kappa = 1)")
    if signal["delta"] is not None:
        bottom.axhline(signal["delta"], color="#ff7f0e", lw=1, label="delta (PARTIAL from here)")
        bottom.axhline(signal["kappa"] * signal["delta"], color="black", lw=1, ls="--",
                       label="kappa x delta (FULL from here)")
    finite = [v for v in values if not np.isnan(v)]
    if finite and signal["delta"] is not None:
        bottom.set_ylim(0, max(max(finite), signal["kappa"] * signal["delta"]) * 1.15)
    bottom.set_ylabel(f"accumulated step distance ({signal['coefficients']})", fontsize=8)
    bottom.set_xlabel("denoising step (letters on top: HetCache's plan; step 0 always computes)")
    bottom.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI body
def analysis_config(preset: str = "hetcache-slow", *, delta: float | None = None, budget: float | None = None,
                    kappa: float | None = None, margin: int | None = None) -> HetCacheConfig:
    """A HetCache preset with the user's overrides; delta or budget (not both) replaces the preset's budget."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: use {' or '.join(PRESETS)}")
    if delta is not None and budget is not None:
        raise UserError("--delta and --budget both decide the plan: give one of them")
    overrides: dict[str, Any] = {}
    if delta is not None:
        overrides.update(delta=delta, budget=None)
    if budget is not None:
        overrides["budget"] = budget
    if kappa is not None:
        overrides["kappa"] = kappa
    if margin is not None:
        overrides["margin"] = margin
    try:
        return dataclasses.replace(method_config(preset), **overrides)
    except ValueError as error:
        raise UserError(f"{error}: check --delta, --budget, --kappa and --margin") from None


def analyze_main(
    video: Path | str,
    mask: Path | str | None,
    box: str | None,
    prompt: str,
    model: str,
    steps: int,
    frames: int | None,
    height: int | None,
    width: int | None,
    seed: int,
    guidance: float,
    device: str,
    dtype: str,
    out: Path | str,
    preset: str = "hetcache-slow",
    delta: float | None = None,
    budget: float | None = None,
    kappa: float | None = None,
    margin: int | None = None,
    negative_prompt: str = "",
    guidance_2: float | None = None,
) -> dict[str, Any]:
    """`hetcache analyze`: write analysis.json, analysis.png and mass_by_class.png into the folder `out`; returns
    the analysis.json content."""
    check_prompt(prompt)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    config = analysis_config(preset, delta=delta, budget=budget, kappa=kappa, margin=margin)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder")
    prepared = prepare_for_model(model, video, mask, box, frames, height, width)
    vio.check_mask_covers(prepared.mask, "analyse")
    files.check_output_folder(out, OUTPUT_FILES, {"input video": video, "mask": mask})
    note = files.removed_note(files.remove_stale(out), out)
    if note:
        print(f"note: {note}", file=sys.stderr)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    num_frames, height, width = prepared.mask.shape
    pipe = load_pipeline(model, torch_device, torch_dtype, height=height, width=width)
    result = analyze(pipe, prepared.video, prepared.mask, prompt, steps=steps, config=config, seed=seed,
                     guidance=guidance, negative_prompt=negative_prompt, guidance_2=guidance_2)
    result["settings"] = _settings(video, mask, box, prompt, model, steps, prepared, seed, guidance, guidance_2, pipe,
                                   config)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "analysis.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    write_heatmaps(out / "analysis.png", result)
    write_mass_plot(out / "mass_by_class.png", result)
    signal = result["plan"]
    print(f"HetCache plan {signal['hetcache']}" + ("" if signal["teacache"] is None else
                                                  f"; TeaCache at the same delta {signal['teacache']}"))
    print("wrote " + ", ".join(str(out / name) for name in OUTPUT_FILES))
    return result


def _settings(video: Any, mask: Any, box: Any, prompt: str, model: str, steps: int, prepared: vio.PreparedInputs,
              seed: int, guidance: float, guidance_2: float | None, pipe: Any,
              config: HetCacheConfig) -> dict[str, Any]:
    import diffusers

    frames, height, width = prepared.mask.shape
    return {
        "video": str(video), "mask": None if mask is None else str(mask), "box": box, "prompt": prompt,
        "model": model, "steps": steps, "frames": frames, "height": height, "width": width, "seed": seed,
        "guidance": guidance, "guidance_2": guidance_2, "device": str(compat.execution_device(pipe)),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."), "config": config.to_dict(),
        "notes": list(prepared.notes),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"hetcache": hetcache.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
