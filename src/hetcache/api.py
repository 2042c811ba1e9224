"""Public entry points: enable / disable HetCache on a WanVACEPipeline or its transformer, read stats, preview plans.

With a pipeline, nothing else is needed: `enable` wraps the pipeline instance's `prepare_masks` so the pixel
mask of every `pipe(video=..., mask=...)` call reaches the engine (the wrapper only records the mask and calls
the original), and the step index comes from `pipe.scheduler.timesteps`. Calling the transformer directly takes
the mask from `enable(..., mask=...)` or `set_mask`, and the steps from `timesteps=` (or counts calls per branch).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry

from hetcache import hooks, plan, tokens
from hetcache.config import HetCacheConfig
from hetcache.core import CacheStats
from hetcache.engine import HetCacheEngine
from hetcache.pipeline import preview_timesteps

_MASK_WRAPPER_FLAG = "_hetcache_mask_wrapper"


def _split(target: Any) -> tuple[Any, torch.nn.Module]:
    """(pipeline or None, transformer) for a WanVACEPipeline or a WanVACETransformer3DModel."""
    transformer = getattr(target, "transformer", None)
    if transformer is not None and hasattr(target, "prepare_masks"):
        if getattr(target, "transformer_2", None) is not None:
            raise NotImplementedError("hetcache does not support two-expert (Wan2.2) pipelines yet")
        return target, transformer
    if isinstance(target, torch.nn.Module) and hasattr(target, "vace_blocks"):
        return None, target
    raise TypeError(f"hetcache expects a WanVACEPipeline or a WanVACETransformer3DModel, got {type(target).__name__}")


def _engine_for(target: Any) -> HetCacheEngine:
    _, transformer = _split(target)
    engine = hooks.engine_of(transformer)
    if engine is None:
        raise RuntimeError("hetcache is not enabled on this model: call hetcache.enable first")
    return engine


def enable(
    target: Any,
    config: Any = None,
    *,
    mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    num_inference_steps: int | None = None,
) -> Any:
    """Turn HetCache (or a baseline cache from `hetcache.methods`) on for a WanVACEPipeline or its transformer.

    A baseline's config implements `attach(transformer, pipeline)`, registering its hooks under the name
    `hetcache.core.HOOK_NAME` with a root hook whose `engine` attribute carries `config` and `stats`; `disable` and
    `stats` then work for it unchanged.

    `mask` (pixel mask [F, H, W], True = generate) or `token_mask` (per-token coverage [T, H', W']) are for direct
    transformer calls; a pipeline gets the mask from each call. `timesteps` lets direct calls find their step
    index (otherwise calls are counted per CFG branch). Enabling twice replaces the earlier engine.
    """
    pipeline, transformer = _split(target)
    if hooks.engine_of(transformer) is not None:
        disable(target)
    if config is not None and not isinstance(config, HetCacheConfig):
        if not hasattr(config, "attach"):
            raise TypeError(f"not a cache configuration: {type(config).__name__}")
        return config.attach(transformer, pipeline)
    engine = HetCacheEngine(
        transformer,
        config or HetCacheConfig(),
        scheduler=None if pipeline is None else pipeline.scheduler,
        timesteps=timesteps,
        num_inference_steps=num_inference_steps,
    )
    if mask is not None or token_mask is not None:
        engine.set_mask(token_mask if mask is None else mask, token_coverage=mask is None)
    hooks.attach(transformer, engine)
    if pipeline is not None:
        _wrap_prepare_masks(pipeline, engine)
    return engine


def disable(target: Any) -> None:
    """Remove every hetcache hook; the stock forward runs again, exactly."""
    pipeline, transformer = _split(target)
    hooks.detach(transformer)  # frees the caches now, not at the next garbage collection
    if pipeline is not None and getattr(pipeline.__dict__.get("prepare_masks"), _MASK_WRAPPER_FLAG, False):
        del pipeline.__dict__["prepare_masks"]


def stats(target: Any) -> CacheStats:
    """What the last (or the running) video's denoising did: plan, FLOPs, token counts, rows, cache bytes."""
    return _engine_for(target).stats


def set_mask(target: Any, mask: torch.Tensor | None, *, token_coverage: bool = False) -> None:
    """Set the mask for direct transformer calls (pixel mask, or per-token coverage with token_coverage=True)."""
    _engine_for(target).set_mask(mask, token_coverage=token_coverage)


def reset(target: Any) -> None:
    """Forget the current video's caches (a pipeline does this itself after every call)."""
    _, transformer = _split(target)
    HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=False)


def plan_for(
    target: Any,
    num_inference_steps: int,
    config: Any = None,
    *,
    mask: torch.Tensor | None = None,
    text_len: int = 512,
) -> str:
    """The plan letters HetCache will run for `num_inference_steps`, computed before any denoising.

    Wan2.1's timestep modulation depends on the timestep only, so thresholds need no video. A budget needs the
    token counts: pass the pixel `mask` [F, H, W] (or enable with a mask first).
    """
    pipeline, transformer = _split(target)
    engine = hooks.engine_of(transformer)
    config = config or (engine.config if engine is not None else HetCacheConfig())
    if config.plan is not None:
        if len(config.plan) != num_inference_steps:
            raise ValueError(f"plan has {len(config.plan)} letters but {num_inference_steps} steps were asked for")
        return config.plan
    timesteps = _timesteps(pipeline, engine, num_inference_steps)
    partition = None
    if config.budget is not None:
        partition = _partition_for_plan(transformer, config, mask, engine)
    letters, _, _ = plan.resolve_plan(
        transformer, config, partition, text_len, timesteps=timesteps, num_steps=num_inference_steps
    )
    return letters


def _timesteps(pipeline: Any, engine: HetCacheEngine | None, num_steps: int) -> torch.Tensor:
    scheduler = pipeline.scheduler if pipeline is not None else None
    if scheduler is None and engine is not None and engine.timesteps is not None:
        if len(engine.timesteps) != num_steps:
            raise ValueError(f"the transformer was enabled with {len(engine.timesteps)} timesteps, not {num_steps}")
        return engine.timesteps
    return preview_timesteps(scheduler, num_steps)


def _partition_for_plan(transformer: torch.nn.Module, config: HetCacheConfig, mask: torch.Tensor | None,
                        engine: HetCacheEngine | None) -> tokens.TokenPartition:
    options = dict(margin=config.margin, gen_threshold=config.gen_threshold, temporal_margin=config.temporal_margin)
    if mask is None and engine is not None and engine.mask.user is not None:
        user_mask, is_coverage = engine.mask.user
        if is_coverage:
            return tokens.partition_tokens(user_mask.float(), **options)
        mask = user_mask
    if mask is None:
        raise ValueError("a budget plan needs the token counts: pass mask= (pixel mask [F, H, W])")
    grid = tokens.latent_grid(tuple(mask.shape), tuple(transformer.config.patch_size))
    return tokens.partition_from_pixel_mask(mask, grid, **options)


def _wrap_prepare_masks(pipeline: Any, engine: HetCacheEngine) -> None:
    original = pipeline.prepare_masks

    def prepare_masks(mask: torch.Tensor, reference_images: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        references = len(reference_images[0]) if reference_images else 0
        engine.begin_pipeline_call(mask[0, 0] > 0.5, references)
        return original(mask, reference_images, *args, **kwargs)

    setattr(prepare_masks, _MASK_WRAPPER_FLAG, True)
    pipeline.prepare_masks = prepare_masks
