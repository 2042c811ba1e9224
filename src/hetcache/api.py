"""Public entry points: enable / disable HetCache on a WanVACEPipeline or its transformer, read stats, preview plans.

With a pipeline, nothing else is needed: `enable` wraps four methods of the pipeline instance (`_wrap_pipeline`)
so the mask of every `pipe(video=..., mask=...)` call reaches the engine, the scheduler runs the plan's solver
steps and the progress bar counts them (the wrappers call the originals, the last two with S' in place of S), and
the step index comes from `pipe.scheduler.timesteps`.
Calling the transformer directly takes the mask from `enable(..., mask=...)` or `set_mask`, and the steps from
`timesteps=` (or counts calls per branch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry

from hetcache import hooks, parallel, plan, session
from hetcache.config import HetCacheConfig
from hetcache.core import CacheStats, call_argument
from hetcache.engine import HetCacheEngine
from hetcache.errors import UserError
from hetcache.pipeline import (
    MAX_SEQUENCE_LENGTH,
    default_flow_shift,
    flow_scheduler,
    preview_timesteps,
)

_WRAPPER_FLAG = "_hetcache_wrapper"


def _split(target: Any) -> tuple[Any, list[torch.nn.Module]]:
    """(pipeline or None, its transformers in the order they run) for a WanVACEPipeline (one or two experts) or a
    WanVACETransformer3DModel."""
    if hasattr(target, "prepare_masks") and hasattr(target, "transformer"):
        models = [m for m in (target.transformer, getattr(target, "transformer_2", None)) if m is not None]
        if models:
            return target, models
    if isinstance(target, torch.nn.Module) and hasattr(target, "vace_blocks"):
        return None, [target]
    raise TypeError(f"hetcache expects a WanVACEPipeline or a WanVACETransformer3DModel, got {type(target).__name__}")


def experts_of(pipeline: Any) -> plan.Experts | None:
    """The two experts of a Wan2.2-style pipeline and their switch, or None for one transformer."""
    if pipeline is None:
        return None
    models = _split(pipeline)[1]
    ratio = pipeline.config.get("boundary_ratio") if hasattr(pipeline, "config") else None
    if len(models) < 2 or ratio is None:
        return None
    return plan.Experts(tuple(models), float(ratio) * pipeline.scheduler.config.num_train_timesteps)


def _runtimes(target: Any) -> list[Any]:
    _, models = _split(target)
    runtimes = [hooks.engine_of(model) for model in models]
    if any(runtime is None for runtime in runtimes):
        raise RuntimeError("hetcache is not enabled on this model: call hetcache.enable first")
    return runtimes


def enable(
    target: Any,
    config: Any = None,
    *,
    mask: torch.Tensor | np.ndarray | None = None,
    token_mask: torch.Tensor | np.ndarray | None = None,
    timesteps: torch.Tensor | None = None,
    num_inference_steps: int | None = None,
) -> Any:
    """Turn HetCache (or a baseline cache from `hetcache.methods`) on for a WanVACEPipeline or its transformer.

    A two-expert pipeline (Wan2.2: `transformer` and `transformer_2`, switched at `boundary_ratio`) gets a cache on
    each expert, with separate caches and one plan that starts each expert FULL; the first expert's caches are
    freed when the second starts. A baseline's config implements `attach(transformer, pipeline)`, registering its
    hooks under the name `hetcache.core.HOOK_NAME` with a root hook whose `engine` attribute carries `config` and
    `stats`; `disable` and `stats` then work for it unchanged.

    `mask` (pixel mask [F, H, W], True = generate) or `token_mask` (per-token coverage [T, H', W']) are for direct
    transformer calls; a pipeline gets the mask from each call. `timesteps` lets direct calls find their step
    index (otherwise calls are counted per CFG branch). Enabling twice replaces the earlier engine. Returns the
    engine (the first expert's, with two).
    """
    pipeline, models = _split(target)
    if any(hooks.engine_of(model) is not None for model in models):
        disable(target)
    sharded = any(parallel.ulysses_group(model) is not None for model in models)
    if config is not None and not isinstance(config, HetCacheConfig):
        if not hasattr(config, "attach"):
            raise TypeError(f"not a cache configuration: {type(config).__name__}")
        if sharded and not getattr(config, "context_parallel", False):
            raise UserError(f"{type(config).__name__.removesuffix('Config')} does not run under context "
                            "parallelism: use hetcache, teacache, full or fewer-steps there, or one process")
        return [config.attach(model, pipeline) for model in models][0]
    experts = experts_of(pipeline)
    engines = [HetCacheEngine(model, config or HetCacheConfig(), scheduler=None if pipeline is None else
                              pipeline.scheduler, timesteps=timesteps, num_inference_steps=num_inference_steps,
                              experts=experts) for model in models]
    for engine in engines:
        engine.siblings = [other for other in engines if other is not engine]
        if mask is not None or token_mask is not None:
            engine.set_mask(torch.as_tensor(token_mask if mask is None else mask), token_coverage=mask is None)
        if engine.sharded is not None:  # the engine's hooks run first and split the tokens themselves
            parallel.hand_split_to_engine(engine.transformer)
        hooks.attach(engine.transformer, engine)
    if pipeline is not None:
        _wrap_pipeline(pipeline, engines)
    return engines[0]


def disable(target: Any) -> None:
    """Remove every hetcache hook; the stock forward runs again, exactly."""
    pipeline, models = _split(target)
    for model in models:
        hooks.detach(model)  # frees the caches now, not at the next garbage collection
        parallel.restore_stock_split(model)
    if pipeline is not None:
        _unwrap_pipeline(pipeline)


def stats(target: Any) -> CacheStats:
    """What the last (or the running) video's denoising did: plan, FLOPs, token counts, rows, cache bytes (with two
    experts: both together, and each in `experts`)."""
    parts = [runtime.stats for runtime in _runtimes(target)]
    return parts[0] if len(parts) == 1 else CacheStats.combine(parts)


def set_mask(target: Any, mask: torch.Tensor | np.ndarray | None, *, token_coverage: bool = False) -> None:
    """Set the mask for direct transformer calls (pixel mask, or per-token coverage with token_coverage=True)."""
    for runtime in _runtimes(target):
        runtime.set_mask(None if mask is None else torch.as_tensor(mask), token_coverage=token_coverage)


def reset(target: Any) -> None:
    """Forget the current video's caches (a pipeline does this itself after every call)."""
    for model in _split(target)[1]:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=False)


def plan_for(
    target: Any,
    num_inference_steps: int,
    config: Any = None,
    *,
    mask: torch.Tensor | np.ndarray | None = None,
    text_len: int = 512,
) -> str:
    """The plan letters HetCache will run when `num_inference_steps` are asked for, computed before any denoising:
    one letter per solver step that runs (fewer than asked for with `step_fraction`, or when a budget needs it).

    Wan2.1's timestep modulation depends on the timestep only, so thresholds need no video. A budget needs the
    token counts: pass the pixel `mask` [F, H, W] (or enable with a mask first).
    """
    pipeline, models = _split(target)
    transformer = models[0]
    engine = hooks.engine_of(transformer)
    experts = experts_of(pipeline)
    config = config or (engine.config if engine is not None else HetCacheConfig())
    if config.plan is not None:
        if len(config.plan) != num_inference_steps:
            raise ValueError(f"plan has {len(config.plan)} letters but {num_inference_steps} steps were asked for")
        switch = None if experts is None else experts.switch(preview_timesteps(pipeline.scheduler, num_inference_steps))
        return plan.validate_plan(config.plan, num_inference_steps, () if switch is None else (switch,))
    patch = tuple(transformer.config.patch_size)
    partition = None
    if mask is not None:
        partition = session.pixel_partition(config, torch.as_tensor(mask) > 0.5, patch)
    elif isinstance(engine, HetCacheEngine):
        partition = engine.mask.early_partition(config, patch)
    if partition is None and config.budget is not None:
        raise ValueError("a budget plan needs the token counts: pass mask= (pixel mask [F, H, W])")

    size = None if mask is None else tuple(torch.as_tensor(mask).shape[1:])

    def timesteps_for(steps: int) -> torch.Tensor:
        return _timesteps(pipeline, engine, steps, size)

    steps = plan.solver_steps(transformer, config, num_inference_steps, partition=partition, text_len=text_len,
                              timesteps_for=timesteps_for, experts=experts)
    letters, _, _ = plan.resolve_plan(transformer, config, partition, text_len, timesteps=timesteps_for(steps),
                                      num_steps=steps, requested_steps=num_inference_steps, experts=experts)
    return letters


def expert_switch(target: Any, steps: int) -> int | None:
    """The first solver step of a two-expert pipeline's second expert when it runs `steps` steps (None: one
    expert, or the second runs no step)."""
    pipeline, _ = _split(target)
    experts = experts_of(pipeline)
    return None if experts is None else experts.switch(preview_timesteps(pipeline.scheduler, steps))


def _timesteps(pipeline: Any, engine: Any, num_steps: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The timesteps of `num_steps` steps: the pipeline's scheduler, the transformer's fixed ones, or (a bare
    transformer) the recipe's scheduler for the video size: flow shift 5.0 at 720p, 3.0 below."""
    scheduler = pipeline.scheduler if pipeline is not None else None
    fixed = getattr(engine, "timesteps", None)
    if scheduler is None and fixed is not None:
        if len(fixed) != num_steps:
            raise ValueError(f"the transformer was enabled with {len(fixed)} timesteps, not {num_steps}")
        return fixed
    if scheduler is None:
        scheduler = flow_scheduler(default_flow_shift(*size) if size else 3.0)
    return preview_timesteps(scheduler, num_steps)


# ------------------------------------------------------------------------------------------------ pipelines
def _wrap_pipeline(pipeline: Any, engines: list[HetCacheEngine]) -> None:
    """Wrap four methods of this pipeline instance (each calls the original: `check_inputs` and `prepare_masks`
    with their arguments unchanged, `scheduler.set_timesteps` and `progress_bar` with S' in place of S) so the
    engines learn what a `pipe(...)` call does before its first denoising step:

    - `check_inputs` (first): the call's mask, from which the solver step count of a budget can be solved;
    - `scheduler.set_timesteps`: runs S' of the S steps asked for (`HetCacheEngine.solver_steps`);
    - `prepare_masks`: the preprocessed pixel mask and the reference images, which define the partition;
    - `progress_bar`: counts the S' steps that run, not the S asked for.
    """
    check_inputs, prepare_masks, progress_bar = pipeline.check_inputs, pipeline.prepare_masks, pipeline.progress_bar
    scheduler = pipeline.scheduler
    set_timesteps = scheduler.set_timesteps
    solver_steps: dict[int, int] = {}  # requested -> run, for the progress bar

    def checked(*args: Any, **kwargs: Any) -> Any:
        def argument(name: str) -> Any:
            return call_argument(type(pipeline).check_inputs, args, kwargs, name)

        raw_mask, height, width = argument("mask"), argument("height"), argument("width")
        count = _reference_count(argument("reference_images"))
        embeds = argument("prompt_embeds")
        for engine in engines:
            if raw_mask is not None:  # made lazily: only a budget without step_fraction needs it this early
                engine.mask.early = (lambda: _pixel_mask(pipeline, raw_mask, height, width), count)
            engine.text_len_hint = embeds.shape[1] if embeds is not None else _text_length(pipeline)
        return check_inputs(*args, **kwargs)

    def timesteps(num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> Any:
        if num_inference_steps is not None:
            requested, num_inference_steps = num_inference_steps, engines[0].solver_steps(num_inference_steps)
            for engine in engines[1:]:
                engine.requested_steps = requested
            solver_steps[requested] = num_inference_steps
        return set_timesteps(num_inference_steps, *args, **kwargs)

    def bar(iterable: Any = None, total: int | None = None) -> Any:
        return progress_bar(iterable=iterable, total=solver_steps.get(total, total))

    def masks(mask: torch.Tensor, reference_images: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        references = len(reference_images[0]) if reference_images else 0
        for engine in engines:
            engine.begin_pipeline_call(mask[0, 0] > 0.5, references)
        return prepare_masks(mask, reference_images, *args, **kwargs)

    for owner, name, wrapper in ((pipeline, "check_inputs", checked), (scheduler, "set_timesteps", timesteps),
                                 (pipeline, "prepare_masks", masks), (pipeline, "progress_bar", bar)):
        setattr(wrapper, _WRAPPER_FLAG, True)
        setattr(owner, name, wrapper)


def _unwrap_pipeline(pipeline: Any) -> None:
    for owner, name in ((pipeline, "check_inputs"), (pipeline.scheduler, "set_timesteps"), (pipeline, "prepare_masks"),
                        (pipeline, "progress_bar")):
        if getattr(owner.__dict__.get(name), _WRAPPER_FLAG, False):
            del owner.__dict__[name]


def _text_length(pipeline: Any) -> int:
    """The text length the pipeline's prompt embeddings will have: its default `max_sequence_length` (512), or the
    tokenizer's shorter limit (as `pipeline.run_edit` passes it)."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    return min(MAX_SEQUENCE_LENGTH, int(limit)) if limit else MAX_SEQUENCE_LENGTH


def _reference_count(reference_images: Any) -> int:
    """How many reference images a pipeline call got (one image, a list, or one list per video)."""
    if not reference_images:
        return 0
    if not isinstance(reference_images, list):
        return 1
    return len(reference_images[0]) if isinstance(reference_images[0], list) else len(reference_images)


def _pixel_mask(pipeline: Any, mask: Any, height: int, width: int) -> torch.Tensor:
    """The pipeline call's mask [F, H, W] (True = generate) as `WanVACEPipeline.preprocess_conditions` makes it from
    the user's frames (its video processor, then (m + 1) / 2 > 0.5)."""
    frames = pipeline.video_processor.preprocess_video(mask, height, width)
    return (frames[0, 0] + 1) / 2 > 0.5
