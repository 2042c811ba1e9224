"""The step dispatcher: diffusers hooks that hand each transformer call, block call and `norm_out` input to the
engine, and run what the engine decided (the stock forward, a CUDA-graph replay, or REUSE without the forward).

The transformer-level hook is the only stateful one: it keeps one `BranchState` per `cache_context` ("cond" /
"uncond") and ends the video when the pipeline resets stateful hooks after a call.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from hetcache import compat
from hetcache.core import DEFAULT_CONTEXT, HOOK_NAME, call_argument
from hetcache.engine import BranchState, HetCacheEngine


def reuse_forward(transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                  text: torch.Tensor, residual: torch.Tensor, chunk: slice | None = None) -> torch.Tensor:
    """A REUSE call: patch embedding, h_in + R, the output head. Nothing else of the forward is needed, so
    it is not run (the VACE embedding, RoPE tables, the text projection and 45 no-op block calls cost more
    than the arithmetic here). The head follows `WanVACETransformer3DModel.forward`'s step 6. `chunk`: under
    context parallelism the tokens `residual` covers; the head runs on them and `proj_out`'s gather completes
    the output."""
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = transformer.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    if chunk is not None:
        tokens = tokens[:, chunk]
    embedder = transformer.condition_embedder
    timestep = embedder.timesteps_proj(timestep)
    time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
    temb = embedder.time_embedder(timestep.to(time_dtype)).type_as(text)
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = tokens.float() + residual.float()
    hidden = (transformer.norm_out(hidden) * (1 + scale) + shift).type_as(tokens)
    hidden = transformer.proj_out(hidden)
    hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class TransformerHook(ModelHook):
    """Root hook: asks the engine what each call does and runs it; keeps per-branch state."""

    _is_stateful = True

    def __init__(self, engine: HetCacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self.state_manager = StateManager(BranchState)
        engine.branches = compat.branch_states(self.state_manager)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        def argument(name: str) -> Any:
            return call_argument(type(module).forward, args, kwargs, name)

        hidden_states, timestep = argument("hidden_states"), argument("timestep")
        text = argument("encoder_hidden_states")
        branch, name = compat.current_branch(self.state_manager, DEFAULT_CONTEXT)
        try:
            ctx = self.engine.begin_call(hidden_states, timestep, text, branch, name)
            if ctx.kind == "P" and self.engine.graphs_active:
                def use_inputs(rows: torch.Tensor, static_args: tuple, static_kwargs: dict) -> None:
                    timestep = call_argument(type(module).forward, static_args, static_kwargs, "timestep")
                    self.engine.use_rows(rows, timestep)

                return self.engine.graphs.run(name, ctx.rows, args, kwargs, self.fn_ref.original_forward, use_inputs)
            if ctx.kind != "R":
                return self.fn_ref.original_forward(*args, **kwargs)
            with torch.no_grad():
                residual, chunk = self.engine.reuse_inputs()
                output = reuse_forward(module, hidden_states, timestep, text, residual, chunk)
            return Transformer2DModelOutput(sample=output) if argument("return_dict") else (output,)
        finally:
            self.engine.end_call()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.engine.end_video()
        return module


class MainBlockHook(ModelHook):
    def __init__(self, engine: HetCacheEngine, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward = type(module).forward
        hidden_states, text, temb, rotary_emb = (call_argument(forward, args, kwargs, name) for name in (
            "hidden_states", "encoder_hidden_states", "temb", "rotary_emb"))
        with torch.no_grad():
            out = self.engine.main_block(module, self.layer, hidden_states, text, temb, rotary_emb)
        if out is not None:
            return out
        args, kwargs = self.engine.stock_arguments(forward, self.layer, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class VaceBlockHook(ModelHook):
    def __init__(self, engine: HetCacheEngine, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        forward = type(module).forward
        hidden_states, text, control, temb, rotary_emb = (call_argument(forward, args, kwargs, name) for name in (
            "hidden_states", "encoder_hidden_states", "control_hidden_states", "temb", "rotary_emb"))
        with torch.no_grad():
            out = self.engine.vace_block(module, self.layer, hidden_states, text, control, temb, rotary_emb)
        if out is not None:
            return out
        args, kwargs = self.engine.stock_arguments(forward, self.layer, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class OutputNormHook(ModelHook):
    def __init__(self, engine: HetCacheEngine) -> None:
        super().__init__()
        self.engine = engine

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        with torch.no_grad():
            return (self.engine.assemble(args[0]),), kwargs


def attach(transformer: torch.nn.Module, engine: HetCacheEngine) -> None:
    """Register the engine's hooks on a WanVACETransformer3DModel."""
    for index, block in enumerate(transformer.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(MainBlockHook(engine, index), HOOK_NAME)
    for index, block in enumerate(transformer.vace_blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(VaceBlockHook(engine, index), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer.norm_out).register_hook(OutputNormHook(engine), HOOK_NAME)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(TransformerHook(engine), HOOK_NAME)
    registry.invalidate_child_registries_cache()


def detach(transformer: torch.nn.Module) -> None:
    """Remove every hook registered under HOOK_NAME (the engine's or a baseline's), resetting the root's state."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    root = registry.get_hook(HOOK_NAME)
    if root is not None and compat.is_stateful(root):
        root.reset_state(transformer)
    registry.remove_hook(HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()


def engine_of(transformer: torch.nn.Module) -> Any:
    """The runtime (`HetCacheEngine` or a baseline's) behind the hooks on `transformer`, or None."""
    registry = compat.hook_registry(transformer)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.engine if hook is not None else None
