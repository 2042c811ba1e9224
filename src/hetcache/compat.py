"""Every private diffusers (and accelerate) attribute hetcache reads, each behind one function.

diffusers gives caches no public way to reach these; if an upgrade renames one, the function here is the only
place to change, and tests/test_compat.py fails first with the attribute's name (diffusers 0.42.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: the CLI reads pipeline.py, which uses this module, before torch loads
    import torch
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager


def hook_registry(module: torch.nn.Module) -> HookRegistry | None:
    """The diffusers hook registry of `module`, or None when no hook was ever registered on it."""
    return getattr(module, "_diffusers_hook", None)


def has_offloading_hooks(module: torch.nn.Module) -> bool:
    """Whether `module` is under accelerate's hooks or diffusers' group offloading (both move weights during the
    forward, which a CUDA-graph capture cannot follow)."""
    registry = hook_registry(module)
    return hasattr(module, "_hf_hook") or (registry is not None and any("offload" in name for name in registry.hooks))


def is_stateful(hook: ModelHook) -> bool:
    """Whether the pipeline resets `hook` after each call (`ModelHook._is_stateful`)."""
    return bool(hook._is_stateful)


def branch_states(manager: StateManager) -> dict[str, BaseState]:
    """The live dict of per-context states of a StateManager (keyed by `cache_context` name; updated in place)."""
    return manager._state_cache


def current_branch(manager: StateManager, default: str) -> tuple[BaseState, str]:
    """(state, name) of the context the pipeline set with `cache_context`; a call made outside any context runs in
    context `default`."""
    if manager._context is None:
        from diffusers.hooks.hooks import CacheContext

        manager.set_context(CacheContext(default))
    return manager.get_state(), manager.context.name


def context_name(manager: StateManager) -> str | None:
    """The name of the current cache context, or None outside `cache_context`."""
    context = manager._context
    return None if context is None else context.name


def attention_backend(attn: torch.nn.Module) -> Any:
    """The attention backend the user chose for this attention module (`set_attention_backend`), or None."""
    return attn.processor._attention_backend


def execution_device(pipe: Any) -> torch.device:
    """The device a pipeline runs its denoiser on (offloading included)."""
    return pipe._execution_device


def keep_in_fp32_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the sub-modules a model keeps in float32 when cast to a lower precision."""
    return tuple(model._keep_in_fp32_modules or ())


def progress_bar_config(pipe: Any) -> dict | None:
    """The options a pipeline gives its progress bars (`set_progress_bar_config`), or None when never set."""
    return getattr(pipe, "_progress_bar_config", None)


def restore_progress_bar_config(pipe: Any, config: dict | None) -> None:
    """Put back what `progress_bar_config` returned (None: never set)."""
    if config is None:
        pipe.__dict__.pop("_progress_bar_config", None)
    else:
        pipe._progress_bar_config = config


# ------------------------------------------------------------------------------------- context parallelism
def parallel_config(model: torch.nn.Module) -> Any:
    """The `ParallelConfig` that `enable_parallelism` recorded on a model (None before), which diffusers' Ulysses
    attention reads its group and degree from."""
    return model._parallel_config


def record_parallel_config(model: torch.nn.Module, config: Any, attention_modules: list[torch.nn.Module]) -> None:
    """Record `config` on the model and on the processors of `attention_modules`, as `enable_parallelism` does (the
    processors hand it to `dispatch_attention_fn`, which then runs Ulysses attention)."""
    model._parallel_config = config
    for module in attention_modules:
        module.processor._parallel_config = config


def active_attention_backend() -> Any:
    """diffusers' global attention backend (`AttentionBackendName`), used where a processor names none."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry.get_active_backend()[0]


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, forward_op: Any,
                      config: Any) -> torch.Tensor:
    """diffusers' Ulysses attention (`_templated_context_parallel_attention`) with our own attention in the
    middle: query, key and value [B, n, heads, head_dim] of this rank's rows go to head shards [B, n x P,
    heads / P, head_dim] (one all-to-all each), `forward_op(ctx, query, key, value, *options, **flags)` attends
    there, and its output comes back (one all-to-all). `config`: the model's `parallel_config`."""
    from diffusers.models.attention_dispatch import (
        _templated_context_parallel_attention,
    )

    return _templated_context_parallel_attention(query, key, value, forward_op=forward_op, backward_op=None,
                                                 _parallel_config=config)
