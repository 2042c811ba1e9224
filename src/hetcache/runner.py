"""Running methods like for like: shared inputs and initial latents, each method's config for the run's step
count, one timed denoising run, and the same compilation for every method. `bench`, `eval` and `sweep` use it.

Like for like means:
- every run gets the same video, mask, prompt, seed and initial latents (`initial_latents`, drawn once on the
  CPU and passed to the pipeline);
- step-count dependent defaults are fitted to the run (`methods.method_config(..., steps=...)`);
- with `compile`, the dense reference and every method are compiled the same way (`compile_blocks`: each main
  and VACE block's stock forward goes through `torch.compile` once, before any method's hooks wrap it; the
  HetCache engine also compiles its row-subset block maths, `HetCacheConfig(compile=True)`), and every method
  runs once untimed before its timed run, so compilation is never timed and speedups compare compiled with
  compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import hetcache
from hetcache import compat, parallel
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.memory import MemoryEstimate, estimate_memory, fit
from hetcache.methods import check_method_name, check_options, method_config
from hetcache.pipeline import MAX_SEQUENCE_LENGTH, default_flow_shift, experts, run_edit

REFERENCE = "full"
WARMUP_STEPS = 1  # one untimed run of the plain pipeline pays for lazy initialisation (CUDA context, allocator)
_COMPILED_FLAG = "_hetcache_compiled"
COMPILED_VARIANTS = 64  # dynamo's recompile limit while blocks are compiled (its default is 8)


def initial_latents(pipe: Any, num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The pipeline's initial noise for this size, drawn once from `seed` on the CPU (identical on every device)."""
    shape = (
        1,
        pipe.transformer.config.in_channels,
        (num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
        height // pipe.vae_scale_factor_spatial,
        width // pipe.vae_scale_factor_spatial,
    )
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return noise.to(compat.execution_device(pipe))


def method_configs(
    methods: Sequence[str | tuple[str, Any]],
    *,
    steps: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    compile: bool = False,
) -> list[tuple[str, Any]]:
    """(name, config) for every method: a given config as it is, else the method's config for `steps` steps
    with the user's `options` (checked: unknown keys or bad values are a UserError). With `compile`, HetCache
    engine configs compile their block maths. An option for a method not in `methods` is refused too."""
    options = options or {}
    pairs = [(m, None) if isinstance(m, str) else tuple(m) for m in methods]
    for name, _ in pairs:
        check_method_name(name)
    unused = sorted(set(options) - {name for name, _ in pairs})
    if unused:
        raise UserError(f"--method-option for {unused[0]}, which is not among the methods run: add it or drop it")
    configs = []
    for name, given in pairs:
        config = given
        if config is None:
            config = method_config(name, steps=steps, **check_options(name, options.get(name, {}), steps))
        if compile and isinstance(config, HetCacheConfig):
            config = dataclasses.replace(config, compile=True)
        configs.append((name, config))
    return configs


def cache_options(names: Sequence[str], options: dict[str, dict[str, Any]] | None,
                  cache: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`options` with the cache settings `cache` (`--cache-device`, `--cache-dtype`: {"cache_device": ...,
    "cache_dtype": ...}) added for every HetCache engine method among `names` (HetCache and TeaCache); a key the
    user set for one method with `--method-option` keeps that value. Cache settings with no such method to apply
    to are a UserError."""
    options = {name: dict(given) for name, given in (options or {}).items()}
    cache = {key: value for key, value in (cache or {}).items() if value is not None}
    if not cache:
        return options
    engine_methods = [name for name in dict.fromkeys(names)
                      if isinstance(method_config(check_method_name(name)), HetCacheConfig)]
    if not engine_methods:
        flags = " and ".join(f"--{key.replace('_', '-')}" for key in cache)
        raise UserError(f"{flags} set HetCache's cache, and no HetCache method runs ({', '.join(names)}): drop "
                        f"{'them' if len(cache) > 1 else 'it'} or run hetcache, hetcache-slow or hetcache-fast")
    for name in engine_methods:
        options[name] = {**cache, **options.get(name, {})}
    return options


def check_fit(pipe: Any, configs: Sequence[tuple[str, Any]], num_frames: int, height: int, width: int,
              guidance: float) -> dict[str, tuple[MemoryEstimate, str]]:
    """Before denoising: each HetCache engine config's cache estimate for this video and where it goes ("device"
    or "host", `memory.fit`), {name: (estimate, where)}. A cache that fits nowhere is `fit`'s one-line UserError,
    naming the ways out (--cache-device cpu, --cache-dtype float8_e4m3fn, fewer frames, a smaller size). Two
    experts hold one expert's caches at a time (the first's are freed at the switch). Under context parallelism
    the estimate is one process's."""
    transformer = pipe.transformer
    device = compat.execution_device(pipe)
    group = parallel.ulysses_group(transformer)
    text_len = min(MAX_SEQUENCE_LENGTH, int(getattr(pipe.tokenizer, "model_max_length", MAX_SEQUENCE_LENGTH)))
    branches = 2 if guidance > 1 else 1
    found = {}
    for name, config in configs:
        if isinstance(config, HetCacheConfig):
            estimate = estimate_memory(transformer, num_frames, height, width, config, dtype=transformer.dtype,
                                       text_len=text_len, branches=branches,
                                       shards=group.degree if group is not None else 1)
            found[name] = (estimate, fit(estimate, device, config.cache_device)[0])
    return found


def describe_fit(estimate: MemoryEstimate, where: str, device: Any) -> str:
    """'cache 0.12 GiB (...) on cuda:0' or '... on the host'."""
    return f"{estimate.describe()} on {'the host' if where == 'host' else device}"


def compile_blocks(pipe: Any) -> None:
    """`torch.compile` every main and VACE block's forward of the pipeline's transformers (both experts of a
    two-expert pipeline), once (later calls do nothing).

    The compiled forward replaces the block's `forward` before any method attaches, so the stock pipeline and
    every method's hooks call the same compiled block (hooks wrap it and call it as the original forward)."""
    # dynamo keeps a few variants of each compiled function before it falls back to eager: VACE block 0 (with
    # proj_in) differs from the other VACE blocks, and hooks inside a block (PAB's attention hooks) are traced
    # into it, one variant per broadcast pattern. Room for those, so that no block silently runs eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_VARIANTS)
    for transformer in experts(pipe):
        if getattr(transformer, _COMPILED_FLAG, False):
            continue
        for block in [*transformer.blocks, *transformer.vace_blocks]:
            block.forward = torch.compile(block.forward)
        setattr(transformer, _COMPILED_FLAG, True)


def fit_scheduler(pipe: Any, height: int, width: int) -> None:
    """Clips may differ in size: each gets the scheduler shift of its own size class (`default_flow_shift`)."""
    shift = default_flow_shift(height, width)
    if pipe.scheduler.config.get("flow_shift") != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=shift)


@dataclass
class MethodRun:
    """One timed run of a method: raw frames, denoising-loop seconds, the method's stats, peak CUDA memory."""

    frames: np.ndarray
    denoise_s: float
    stats: hetcache.CacheStats
    peak_memory_bytes: int | None


def run_method(pipe: Any, config: Any, video: np.ndarray, mask: np.ndarray, prompt: str, steps: int,
               common: dict[str, Any], *, untimed_first: bool = False) -> MethodRun:
    """Run `config` (through `hetcache.enable`) for `steps` steps; `common` holds run_edit's other arguments
    (latents, seed, guidance, ...). A config with `prepare` (MagCache's calibration, cache-dit's fitting) gets it
    first, untimed. `untimed_first` runs the method once before the timed run (compilation)."""
    if hasattr(config, "prepare"):
        config.prepare(pipe.transformer, steps, lambda: run_edit(pipe, video, mask, prompt, steps=steps, **common))
    hetcache.enable(pipe, config)
    try:
        if untimed_first:
            run_edit(pipe, video, mask, prompt, steps=steps, **common)
        cuda = compat.execution_device(pipe).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(compat.execution_device(pipe))
        result = run_edit(pipe, video, mask, prompt, steps=steps, **common)
        peak = torch.cuda.max_memory_allocated(compat.execution_device(pipe)) if cuda else None
        stats = hetcache.stats(pipe)
    finally:
        hetcache.disable(pipe)
    return MethodRun(result.frames, result.timings["denoise"], stats, peak)


# A measured speedup may exceed the analytic one (dense FLOPs over the method's) only by timing noise; beyond this
# share the reference run was slowed by something else (other jobs on a shared machine, a GPU clocking up).
SPEEDUP_NOISE = 0.25


def timing_note(speedup: float | None, flops_ratio: float | None) -> str | None:
    """A caveat when a measured `speedup` is above the analytic bound 1 / `flops_ratio` by more than noise."""
    if speedup is None or not flops_ratio:
        return None
    bound = 1.0 / flops_ratio
    if speedup <= bound * (1.0 + SPEEDUP_NOISE):
        return None
    return (f"measured speedup {speedup:.2f}x is above the analytic {bound:.2f}x by more than timing noise: the "
            f"{REFERENCE} run was likely slowed by other work on the machine; rerun before trusting the timings")


def describe_failure(error: BaseException) -> str:
    """One line for a method that failed: `failed: Type: message`."""
    return f"failed: {type(error).__name__}: {' '.join(str(error).split())}"
