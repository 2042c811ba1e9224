"""FastCache-style caching on WanVACE (method name `fastcache-style`): motion-aware token reduction plus a
statistical per-block cache test, with cached residuals where FastCache has learned linear maps.

FastCache (Liu et al., "FastCache: Fast Caching for Diffusion Transformer Through Learnable Linear
Approximation", arXiv 2505.20353) has two parts:

1. Spatial-temporal token reduction: the saliency of token i is S_i = ||X_t(i) - X_{t-1}(i)||^2 on the
   transformer's input tokens; tokens with S_i above a threshold ("motion") go through the block stack, the
   static ones bypass it through a learned linear map W_c X + b_c.
2. Transformer-level cache: block l is skipped when its input changed little since the previous step,
   delta^2 <= chi^2_{ND, 1-alpha} / ND with delta = ||H_{t,l-1} - H_{t-1,l-1}||_F / ||H_{t-1,l-1}||_F (a
   chi-square test with N x D degrees of freedom); a skipped block is replaced by a learned W_l H + b_l.

Both learned maps need training the paper does per model; no such parameters exist for Wan2.1-VACE. The
zero-parameter substitute used here is the cached residual: a static token leaves the stack as X + R(i), R the
residual of the whole stack for that token at the last step that computed it, and a skipped block returns
H + R_l, R_l its residual (output - input) from the last step that computed it. (W = I and b = the cached
residual; an identity-only substitute, b = 0, would simply drop the block.)

Further choices and deviations:
- motion tokens attend only to each other (the paper runs the stack on the motion tokens alone); RoPE is indexed
  by their positions, and VACE blocks see the same tokens;
- S_i is normalised by its maximum over the tokens and compared with `motion_threshold` (0.1, the default of the
  authors' `motion_threshold`); X is the patch-embedded latent (before any block);
- at video sizes chi^2_{ND,1-alpha}/ND is about 1 (N x D is in the millions), so the test alone would skip every
  block whose input changed by less than 100 %; the authors' released configuration also caps the relative
  change at `cache_ratio_threshold` = 0.05, and so does `max_change` here: skip iff
  delta^2 <= min(chi^2_{ND,1-alpha}/ND, max_change^2). The quantile uses the Wilson-Hilferty approximation;
- delta compares a block's input with its input at the previous step (per token: the last step the token went
  through the block), on the motion tokens; VACE block 0 is tested on the latent input (its control input is
  the same every step), the other VACE blocks on their control input;
- the first `warmup_steps` steps compute everything (nothing is cached before); state per CFG branch;
- the paper's optional token merging is not used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState

from hetcache import flops
from hetcache.methods import base

# What every result of this method carries next to it: it is FastCache's structure, not FastCache.
DEVIATION = "deviation: cached residuals stand in for FastCache's learned linear maps (none exist for Wan)"


@dataclass
class FastCacheConfig:
    """Thresholds of the two FastCache parts; `token_reduction` / `block_cache` switch them on and off."""

    motion_threshold: float = 0.1
    significance: float = 0.05
    max_change: float = 0.05
    warmup_steps: int = 1
    token_reduction: bool = True
    block_cache: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.motion_threshold < 1.0:
            raise ValueError(f"motion_threshold must be in [0, 1), got {self.motion_threshold}")
        if not 0.0 < self.significance < 1.0:
            raise ValueError(f"significance must be in (0, 1), got {self.significance}")
        if self.max_change < 0:
            raise ValueError(f"max_change must be >= 0, got {self.max_change}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (nothing is cached before step 0), got {self.warmup_steps}")

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> FastCacheRuntime:
        runtime = FastCacheRuntime(transformer, self, base.scheduler_of(pipeline))
        hooks = [(block, base.ForwardHook(runtime.main_handler(i))) for i, block in enumerate(transformer.blocks)]
        hooks += [(block, base.ForwardHook(runtime.vace_handler(i))) for i, block in enumerate(transformer.vace_blocks)]
        hooks.append((transformer.norm_out, base.ForwardHook(runtime.output_handler)))
        return base.attach(transformer, runtime, hooks)

    def never_skip(self) -> FastCacheConfig:
        return dataclasses.replace(self, token_reduction=False, block_cache=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def chi2_ratio(degrees: int, significance: float) -> float:
    """chi^2_{k, 1-alpha} / k by the Wilson-Hilferty approximation (accurate for the large k met here)."""
    z = float(torch.special.ndtri(torch.tensor(1.0 - significance, dtype=torch.float64)))
    h = 2.0 / (9.0 * degrees)
    return (1.0 - h + z * math.sqrt(h)) ** 3


class FastCacheState(BaseState):
    """One branch: previous input tokens, the stack residual, and per block its last input and residual."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.previous_tokens: torch.Tensor | None = None
        self.stack_residual: torch.Tensor | None = None
        self.inputs: dict[tuple[str, int], torch.Tensor] = {}
        self.residuals: dict[tuple[str, int], Any] = {}


@dataclass
class _Work:
    """What the current call decided and did."""

    warm: bool
    decided: bool = False
    rows: torch.Tensor | None = None  # motion token indices; None = all tokens
    tokens: torch.Tensor | None = None  # the call's full input tokens
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    computed: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    skipped: int = 0


class FastCacheRuntime(base.MethodRuntime):
    state_class = FastCacheState

    def __init__(self, transformer: torch.nn.Module, config: FastCacheConfig, scheduler: Any = None) -> None:
        super().__init__(transformer, config, scheduler)
        self.work = _Work(warm=True)

    def begin_call(self, call: base.Call, args: tuple, kwargs: dict) -> None:
        state: FastCacheState = call.state
        fits = state.stack_residual is not None and state.stack_residual.shape[1] == call.tokens
        self.work = _Work(warm=call.index < self.config.warmup_steps or not fits)

    # ------------------------------------------------------------------------------------------- rows
    def _decide_rows(self, tokens: torch.Tensor) -> None:
        work, state = self.work, self.call.state
        if work.decided:
            return
        work.decided, work.tokens = True, tokens
        previous, state.previous_tokens = state.previous_tokens, tokens
        if work.warm or not self.config.token_reduction or previous is None or previous.shape != tokens.shape:
            return
        saliency = (tokens.float() - previous.float()).pow(2).sum(dim=(0, 2))
        peak = float(saliency.max())
        motion = saliency > self.config.motion_threshold * peak  # all False when nothing moved (peak 0)
        if not bool(motion.all()):
            work.rows = motion.nonzero().flatten()

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.work.rows
        return x if rows is None else x.index_select(1, rows)

    def _scatter(self, buffer: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
        """The buffer with the current rows replaced (a new tensor: buffers may alias the model's tensors)."""
        rows = self.work.rows
        return values if rows is None else buffer.index_copy(1, rows, values.to(buffer.dtype))

    def _rope(self, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.work.rows is None:
            return rotary_emb
        if self.work.rope is None:
            self.work.rope = tuple(t.index_select(1, self.work.rows) for t in rotary_emb)
        return self.work.rope

    def _empty(self) -> bool:
        return self.work.rows is not None and self.work.rows.numel() == 0

    # ------------------------------------------------------------------------------------------- block test
    def _skip(self, key: tuple[str, int], block_input: torch.Tensor) -> bool:
        """Record the block's input; True when the cache test passes against the previous step's input."""
        state = self.call.state
        previous_full = state.inputs.get(key)
        state.inputs[key] = self._scatter(previous_full, block_input)
        if self.work.warm or not self.config.block_cache or previous_full is None or key not in state.residuals:
            return False
        previous = self._gather(previous_full).float()
        change = (block_input.float() - previous).pow(2).sum()
        scale = previous.pow(2).sum()
        limit = min(chi2_ratio(block_input.numel(), self.config.significance), self.config.max_change**2)
        return bool(change <= limit * scale)

    def main_handler(self, layer: int):
        def handler(original, *args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, text, temb, rotary_emb = (self.argument("main", args, kwargs, name) for name in (
                "hidden_states", "encoder_hidden_states", "temb", "rotary_emb"))
            if layer == 0:
                self._decide_rows(hidden)
                hidden = self._gather(hidden)
            if self._empty():
                return hidden
            state, key = self.call.state, ("main", layer)
            if self._skip(key, hidden):
                self.work.skipped += 1
                return hidden + self._gather(state.residuals[key])
            out = original(hidden, text, temb, self._rope(rotary_emb))
            state.residuals[key] = self._scatter(state.residuals.get(key), out - hidden)
            self.work.computed.append(key)
            return out

        return handler

    def vace_handler(self, layer: int):
        def handler(original, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, text, control, temb, rotary_emb = (self.argument("vace", args, kwargs, name) for name in (
                "hidden_states", "encoder_hidden_states", "control_hidden_states", "temb", "rotary_emb"))
            if layer == 0:
                self._decide_rows(hidden)
                hidden, control = self._gather(hidden), self._gather(control)
            if self._empty():
                return control, control
            state, key = self.call.state, ("vace", layer)
            if self._skip(key, hidden if layer == 0 else control):
                self.work.skipped += 1
                hint, residual = state.residuals[key]
                return self._gather(hint), control + self._gather(residual)
            hint, control_out = original(hidden, text, control, temb, self._rope(rotary_emb))
            old_hint, old_residual = state.residuals.get(key, (None, None))
            state.residuals[key] = (self._scatter(old_hint, hint), self._scatter(old_residual, control_out - control))
            self.work.computed.append(key)
            return hint, control_out

        return handler

    def output_handler(self, original, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """norm_out's input: computed rows as they are, static tokens as X + R; refreshes R of computed rows."""
        work = self.work
        if self.call is None or work.tokens is None:
            return original(hidden, *args, **kwargs)
        state: FastCacheState = self.call.state
        tokens = work.tokens
        if work.rows is None:
            state.stack_residual = (hidden - tokens.float()).to(tokens.dtype)
            return original(hidden, *args, **kwargs)
        full = (tokens.float() + state.stack_residual.float()).index_copy(1, work.rows, hidden)
        fresh = (hidden - tokens.index_select(1, work.rows).float()).to(tokens.dtype)
        state.stack_residual = state.stack_residual.index_copy(1, work.rows, fresh)
        return original(full, *args, **kwargs)

    def end_call(self, call: base.Call) -> tuple[str, float, int]:
        work = self.work
        rows = call.tokens if work.rows is None else int(work.rows.numel())
        cost = flops.embed_flops(self.shape, call.tokens, call.text_len)
        for group, layer in work.computed:
            if group == "main":
                cost += base.main_block_flops(self.shape, rows, call.text_len)
            else:
                cost += base.vace_block_flops(self.shape, rows, call.text_len, layer)
        if not work.computed:
            letter = "R"
        elif work.rows is None and work.skipped == 0:
            letter = "F"
        else:
            letter = "P"
        return letter, cost, rows
