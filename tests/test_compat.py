"""The private diffusers attributes hetcache reads (hetcache/compat.py): each still exists and means what the
project assumes. A failure here names the attribute a diffusers upgrade changed."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
from tiny_models import tiny_inputs, tiny_transformer

from hetcache import compat
from hetcache.core import call_argument, parameter_names, replace_arguments
from hetcache.pipeline import build_tiny_random_pipeline


class _State(BaseState):
    def reset(self) -> None:
        pass


def test_state_manager_cache_and_context():
    manager = StateManager(_State)
    assert compat.context_name(manager) is None
    state, name = compat.current_branch(manager, "default")
    assert name == "default" and compat.branch_states(manager) == {"default": state}
    manager.set_context(None)
    model = tiny_transformer()
    registry = HookRegistry.check_if_exists_or_initialize(model)

    class Stateful(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = StateManager(_State)

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    hook = Stateful()
    registry.register_hook(hook, "probe")
    assert compat.is_stateful(hook) and compat.hook_registry(model) is registry
    with model.cache_context("uncond"):  # the pipeline's way of naming the branch reaches the manager
        assert compat.context_name(hook.state_manager) == "uncond"
        assert compat.current_branch(hook.state_manager, "default")[1] == "uncond"
    states = compat.branch_states(hook.state_manager)
    registry.reset_stateful_hooks()
    assert states == {}  # the same dict object, emptied by the pipeline's reset


def test_attention_backend_follows_the_users_choice():
    model = tiny_transformer()
    assert compat.attention_backend(model.blocks[0].attn1) is None
    with attention_backend("native"):  # set_attention_backend also sets diffusers' global backend: restore it after
        model.set_attention_backend("_native_math")
    assert compat.attention_backend(model.blocks[0].attn1) == AttentionBackendName._NATIVE_MATH


def test_pipeline_device_and_fp32_modules():
    pipe = build_tiny_random_pipeline()
    assert compat.execution_device(pipe) == torch.device("cpu")
    assert isinstance(compat.keep_in_fp32_modules(pipe.transformer), tuple)
    assert not compat.has_offloading_hooks(pipe.transformer)


def test_call_arguments_by_name_follow_the_signatures():
    model = tiny_transformer()
    x = tiny_inputs(0)
    forward = type(model).forward
    args = (x["hidden_states"], torch.tensor([1.0]), x["encoder_hidden_states"])
    assert call_argument(forward, args, {}, "encoder_hidden_states") is x["encoder_hidden_states"]
    assert call_argument(forward, args, {"control_hidden_states": 3}, "control_hidden_states") == 3
    assert call_argument(forward, args, {}, "return_dict") is True  # the default when not passed
    block = type(model.vace_blocks[0]).forward
    assert call_argument(block, (1, 2, 3), {}, "control_hidden_states") == 3
    args, kwargs = replace_arguments(block, (1, 2, 3), {"temb": 4}, {"control_hidden_states": 30, "temb": 40,
                                                                     "rotary_emb": 50})
    assert args == (1, 2, 30) and kwargs == {"temb": 40, "rotary_emb": 50}
    assert parameter_names(block) == ("hidden_states", "encoder_hidden_states", "control_hidden_states", "temb",
                                      "rotary_emb")


def test_context_parallel_names():
    """What context parallelism reads and writes: the config on the model and its processors (which hand it to
    `dispatch_attention_fn`), the global backend, and the Ulysses template HetCache runs its own attention in."""
    import inspect

    from diffusers.models.attention_dispatch import (
        _templated_context_parallel_attention,
    )
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = tiny_transformer()
    assert compat.parallel_config(model) is None
    modules = [block.attn1 for block in model.blocks]
    marker = object()
    compat.record_parallel_config(model, marker, modules)
    assert compat.parallel_config(model) is marker
    assert all(module.processor._parallel_config is marker for module in modules)
    # self-attention only: cross-attention runs per query token on every rank
    assert "parallel_config=(self._parallel_config if encoder_hidden_states is None else None)" in (
        inspect.getsource(WanAttnProcessor.__call__))
    assert compat.active_attention_backend() == AttentionBackendName.NATIVE
    parameters = inspect.signature(_templated_context_parallel_attention).parameters
    keyword_only = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keyword_only == {"forward_op", "backward_op", "_parallel_config"}
    assert list(parameters)[:3] == ["query", "key", "value"]
