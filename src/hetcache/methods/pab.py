"""Pyramid Attention Broadcast (PAB) on WanVACE: reuse attention outputs across steps inside a timestep window.

PAB (Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast", arXiv 2408.12588) observes that
attention outputs change little in the middle of denoising, and least for cross-attention. Inside a timestep
window it computes each attention every `range` steps and broadcasts (reuses) the output in between, with a
longer range for the more stable attention kinds.

Here: the outputs of `attn1` (self-attention) and `attn2` (cross-attention) of every main block AND every VACE
block are broadcast; the cached tensor is the attention module's output (after its out projection, before the
block's gate). State is kept per CFG branch (`cache_context`), so the uncond call never reuses the cond call's
attention. The step index comes from the scheduler's timesteps; the window is on the timestep value, as in PAB.

Settings and deviations:
- Wan has one joint spatio-temporal self-attention, so PAB's spatial and temporal ranges collapse to one:
  `self_attention_range = 2`, the spatial range of the authors' configurations (VideoSys, also for CogVideoX,
  which likewise has joint attention); `cross_attention_range = 6`, the authors' cross range for Open-Sora.
- `timestep_window = (100, 800)`, exclusive, the default of diffusers' PyramidAttentionBroadcastConfig (the
  authors use [100, 850] for CogVideoX and [450, 930] for Open-Sora's rectified-flow schedule).
- Broadcast when the step lies in the window and fewer than `range` steps passed since the attention kind was
  last computed (the authors count calls modulo the range; the pattern is the same within the window).
- PAB's optional MLP broadcast is not used (off in the authors' CogVideoX configuration).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState

from hetcache.methods import base

KINDS = ("self", "cross")


@dataclass
class PABConfig:
    """Broadcast ranges (in steps) per attention kind and the timestep window (exclusive) where PAB is active."""

    self_attention_range: int = 2
    cross_attention_range: int = 6
    timestep_window: tuple[float, float] = (100.0, 800.0)

    def __post_init__(self) -> None:
        if self.self_attention_range < 1 or self.cross_attention_range < 1:
            raise ValueError("broadcast ranges must be >= 1 (1 broadcasts nothing)")
        self.timestep_window = tuple(float(t) for t in self.timestep_window)
        if len(self.timestep_window) != 2 or self.timestep_window[0] >= self.timestep_window[1]:
            raise ValueError(f"timestep_window must be (low, high) with low < high, got {self.timestep_window}")

    def range_of(self, kind: str) -> int:
        return self.self_attention_range if kind == "self" else self.cross_attention_range

    def in_window(self, timestep: float | None) -> bool:
        low, high = self.timestep_window
        return timestep is not None and low < timestep < high

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> PABRuntime:
        runtime = PABRuntime(transformer, self, base.scheduler_of(pipeline))
        hooks = []
        for group, blocks in (("main", transformer.blocks), ("vace", transformer.vace_blocks)):
            for layer, block in enumerate(blocks):
                for kind, module in zip(KINDS, (block.attn1, block.attn2)):
                    hooks.append((module, base.ForwardHook(runtime.attention_handler((group, layer, kind), kind))))
        return base.attach(transformer, runtime, hooks)

    def never_skip(self) -> PABConfig:
        return dataclasses.replace(self, self_attention_range=1, cross_attention_range=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def broadcast_steps(config: PABConfig, timesteps: Sequence[float]) -> list[dict[str, bool]]:
    """For each step, which attention kinds are broadcast (the runtime applies the same rule)."""
    last: dict[str, int | None] = dict.fromkeys(KINDS)
    steps = []
    for index, timestep in enumerate(timesteps):
        decision = {kind: _broadcast(config, kind, index, timestep, last[kind]) for kind in KINDS}
        for kind in KINDS:
            if not decision[kind]:
                last[kind] = index
        steps.append(decision)
    return steps


def _broadcast(config: PABConfig, kind: str, index: int, timestep: float | None, last: int | None) -> bool:
    return config.in_window(timestep) and last is not None and index - last < config.range_of(kind)


class PABState(BaseState):
    """One branch: the last computed output of every attention module and the step each kind was computed at."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.computed_at: dict[str, int | None] = dict.fromkeys(KINDS)


@dataclass
class _CallPlan:
    broadcast: dict[str, bool]
    keep: bool  # store fresh outputs (the next step may broadcast them)
    saved: float = 0.0
    reused: int = 0


class PABRuntime(base.MethodRuntime):
    state_class = PABState

    def begin_call(self, call: base.Call, args: tuple, kwargs: dict) -> None:
        state: PABState = call.state
        broadcast = {kind: _broadcast(self.config, kind, call.index, call.timestep, state.computed_at[kind])
                     for kind in KINDS}
        for kind in KINDS:
            if not broadcast[kind]:
                state.computed_at[kind] = call.index
        following = None
        if self.timesteps is not None and call.index + 1 < len(self.timesteps):
            following = self.timesteps[call.index + 1]
        keep = self.timesteps is None or self.config.in_window(following)
        self._plan = _CallPlan(broadcast, keep)

    def attention_handler(self, key: tuple, kind: str):
        def handler(original, *args: Any, **kwargs: Any) -> torch.Tensor:
            call, plan = self.call, self._plan
            state: PABState = call.state
            cached = state.outputs.get(key)
            query = self.argument("attention", args, kwargs, "hidden_states")
            if plan.broadcast[kind] and cached is not None and cached.shape[:-1] == query.shape[:-1]:
                plan.reused += 1
                plan.saved += self._attention_cost(kind, call)
                return cached
            out = original(*args, **kwargs)
            if plan.keep:
                state.outputs[key] = out
            else:
                state.outputs.pop(key, None)
            return out

        return handler

    def _attention_cost(self, kind: str, call: base.Call) -> float:
        if kind == "self":
            return base.self_attention_flops(self.shape, call.tokens, call.tokens)
        return base.cross_attention_flops(self.shape, call.tokens, call.text_len)

    def end_call(self, call: base.Call) -> tuple[str, float, int]:
        plan = self._plan
        cost = base.dense_flops(self.shape, call.tokens, call.text_len) - plan.saved
        return ("P" if plan.reused else "F"), cost, call.tokens
