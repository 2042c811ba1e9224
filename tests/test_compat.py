"""The private diffusers attributes hetcache reads (hetcache/compat.py): each still exists and means what the
project assumes. A failure here names the attribute a diffusers upgrade changed."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend
from tiny_models import tiny_inputs, tiny_transformer

from hetcache import compat
from hetcache.core import call_argument
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
