"""Plumbing shared by the baseline caches: a root hook with per-branch state, delegating sub-module hooks, the
call's step and arguments, and the analytic cost of what a call ran.

Every hook is registered through diffusers' `HookRegistry` under `core.HOOK_NAME`, so `hetcache.disable` removes
a baseline exactly as it removes the HetCache engine. The root (transformer-level) hook is the only stateful one:
it keeps one `BaseState` per `cache_context` name ("cond" / "uncond"), and the pipeline's reset after each call
ends the video. Sub-module hooks read the current call (`MethodRuntime.call`) and its branch state from the
runtime, so caches never leak from one CFG branch into the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from hetcache import compat, flops
from hetcache.core import (
    DEFAULT_CONTEXT,
    HOOK_NAME,
    CacheStats,
    StepClock,
    call_argument,
)


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in `value` (a tensor, or dicts / lists / tuples of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


# ------------------------------------------------------------------------------------------------ costs
def self_attention_flops(shape: flops.ModelShape, rows: int, keys: int) -> float:
    """Q, K, V, O projections of `rows` tokens and their attention to `keys` keys (part of `flops.block_flops`)."""
    return float(8 * rows * shape.dim**2 + 4 * rows * keys * shape.dim)


def cross_attention_flops(shape: flops.ModelShape, rows: int, text_len: int) -> float:
    """Cross-attention of `rows` tokens to the text, text K/V projections included (the stock forward makes them)."""
    d = shape.dim
    return float(4 * rows * d * d + 4 * rows * text_len * d + 4 * text_len * d * d)


def main_block_flops(shape: flops.ModelShape, rows: int, text_len: int) -> float:
    """One stock main block on `rows` tokens attending to each other."""
    return flops.block_flops(shape, rows, rows, text_len, text_kv=True)


def vace_block_flops(shape: flops.ModelShape, rows: int, text_len: int, layer: int) -> float:
    """One stock VACE block on `rows` tokens (the first one also runs proj_in)."""
    return flops.vace_block_flops(shape, rows, rows, text_len, text_kv=True, first=layer == 0)


def dense_flops(shape: flops.ModelShape, tokens: int, text_len: int) -> float:
    """One stock transformer call."""
    return flops.forward_flops(shape, tokens, tokens, text_len, text_kv=True)


# ------------------------------------------------------------------------------------------------ runtime
@dataclass
class Call:
    """One transformer call (one CFG branch of one denoising step), as the sub-module hooks see it."""

    index: int  # denoising step
    branch: str  # cache_context name
    state: Any  # the branch's state (the method's BaseState)
    first_branch: bool  # the branch whose letters make the plan
    tokens: int  # N
    text_len: int  # L
    timestep: float | None


class EmptyState(BaseState):
    """Branch state of methods that keep nothing."""

    def reset(self) -> None:
        pass


class MethodRuntime:
    """The `engine` of a baseline: its config, its stats, the current call, and the per-call decisions.

    Subclasses set `state_class` and override `begin_call` (decide, before the blocks run) and `end_call`
    (return the step letter, the analytic FLOPs of the call and the rows it computed).
    """

    state_class: type[BaseState] = EmptyState

    def __init__(self, transformer: torch.nn.Module, config: Any, scheduler: Any = None) -> None:
        self.transformer = transformer
        self.config = config
        self.clock = StepClock(scheduler)
        self.shape = flops.ModelShape.from_config(transformer.config)
        self.stats = CacheStats()
        self.call: Call | None = None
        self.states: dict[str, BaseState] = {}  # the root hook's StateManager cache, keyed by branch
        self.timesteps: list[float] | None = None
        self._calls: dict[str, int] = {}
        self._first_branch = ""
        self._video_open = False
        # The forwards whose arguments the hooks read by name (`argument`).
        self._forwards = {"transformer": type(transformer).forward, "main": type(transformer.blocks[0]).forward,
                          "vace": type(transformer.vace_blocks[0]).forward,
                          "attention": type(transformer.blocks[0].attn1).forward}

    def argument(self, caller: str, args: tuple, kwargs: dict, name: str) -> Any:
        """Argument `name` of a call of the transformer, a main block, a VACE block or an attention module
        (`caller`: "transformer", "main", "vace", "attention")."""
        return call_argument(self._forwards[caller], args, kwargs, name)

    # ---------------------------------------------------------------------------------- for subclasses
    @property
    def num_steps(self) -> int | None:
        return None if self.timesteps is None else len(self.timesteps)

    def new_video(self) -> None:
        """A video starts: per-video state outside the branch states is reset here."""

    def begin_call(self, call: Call, args: tuple, kwargs: dict) -> None:
        """Decide what this call does, before any block runs."""

    def end_call(self, call: Call) -> tuple[str, float, int]:
        """(letter, FLOPs, computed rows) of the finished call; the default is a stock call."""
        return "F", dense_flops(self.shape, call.tokens, call.text_len), call.tokens

    def detach(self) -> None:
        """The hooks are being removed (`hetcache.disable`)."""

    # ---------------------------------------------------------------------------------- for the root hook
    def start(self, args: tuple, kwargs: dict, state: BaseState, branch: str) -> None:
        hidden_states = self.argument("transformer", args, kwargs, "hidden_states")
        timestep = self.argument("transformer", args, kwargs, "timestep")
        text = self.argument("transformer", args, kwargs, "encoder_hidden_states")
        p_t, p_h, p_w = self.transformer.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        value = None if timestep is None else float(timestep.flatten()[0])
        if not self._video_open:
            self._open_video(branch)
        index = self.clock.index(value, self._calls.get(branch, 0))
        if index == 0 and branch == self._first_branch and self.stats.plan:
            self._open_video(branch)  # direct calls starting a new video without a pipeline reset
        self._calls[branch] = self._calls.get(branch, 0) + 1
        self.call = Call(index, branch, state, branch == self._first_branch, tokens, text.shape[1], value)
        self.begin_call(self.call, args, kwargs)

    def finish(self) -> None:
        call, self.call = self.call, None
        if call is None:
            return
        letter, cost, rows = self.end_call(call)
        self.stats.flops += cost
        self.stats.dense_flops += dense_flops(self.shape, call.tokens, call.text_len)
        self.stats.record(call.branch, letter, rows, call.first_branch)
        held = sum(tensor_bytes(vars(state)) for state in self.states.values())
        self.stats.cache_bytes = max(self.stats.cache_bytes, held)

    def end_video(self) -> None:
        """The pipeline reset its stateful hooks: the video is over; the stats stay readable."""
        self._video_open = False
        self.call = None

    def _open_video(self, branch: str) -> None:
        for state in self.states.values():
            state.reset()
        self.stats = CacheStats()
        self._calls.clear()
        self._first_branch = branch
        self._video_open = True
        timesteps = self.clock.timesteps()
        self.timesteps = None if timesteps is None else [float(t) for t in timesteps.detach().float().cpu()]
        self.new_video()


# ------------------------------------------------------------------------------------------------ hooks
class RootHook(ModelHook):
    """Transformer-level hook: per-branch state, the call's step, accounting. `engine` is the method's runtime."""

    _is_stateful = True

    def __init__(self, runtime: MethodRuntime) -> None:
        super().__init__()
        self.engine = runtime
        self.state_manager = StateManager(runtime.state_class)
        runtime.states = compat.branch_states(self.state_manager)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state, name = compat.current_branch(self.state_manager, DEFAULT_CONTEXT)
        self.engine.start(args, kwargs, state, name)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.engine.finish()
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.engine.end_video()
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        self.engine.detach()
        return module


class ForwardHook(ModelHook):
    """Runs `handler(original_forward, *args, **kwargs)` in place of a sub-module's forward (stateless)."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        super().__init__()
        self.handler = handler

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.handler(self.fn_ref.original_forward, *args, **kwargs)


def attach(
    transformer: torch.nn.Module, runtime: MethodRuntime, hooks: Iterable[tuple[torch.nn.Module, ModelHook]] = ()
) -> MethodRuntime:
    """Register the sub-module hooks, then the root hook, all under HOOK_NAME."""
    for module, hook in hooks:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(RootHook(runtime), HOOK_NAME)
    registry.invalidate_child_registries_cache()
    return runtime


def scheduler_of(pipeline: Any) -> Any:
    return None if pipeline is None else getattr(pipeline, "scheduler", None)
