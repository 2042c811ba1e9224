"""Method-level reference for PARTIAL steps, built from the stock diffusers forward only (float32, CPU).

DESIGN section 5 defines a PARTIAL step on rows S as: every sub-layer runs on S, and S's queries attend to all N
keys, those of the tokens outside S being the ones recorded at the last FULL step; outside S the output is
head(h_in + R), with R = h_out - h_in of the block stack at that FULL step. Here that definition is rebuilt
independently of the engine: the stock forward runs on every token, and each self-attention call (main and VACE
blocks) has the K/V rows of the tokens outside S swapped for those recorded at the FULL step. Rows outside S then
compute something else, but cannot reach S (they only enter S's attention through the swapped K/V, and every
other sub-layer is per token), so S's rows are what the method promises.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.transformers import transformer_wan
from tiny_models import box_mask, output_head, tiny_inputs, tiny_transformer, token_rows

import hetcache
from hetcache.hooks import engine_of

TOL = 1e-5
GRID = (3, 4, 6)
T_FULL, T_PARTIAL = 900.0, 700.0


class SelfAttentionKV:
    """Records (or, with `swap_rows`, replaces) the K/V of every self-attention call of a stock forward.

    Each `attn1` announces itself through a forward pre-hook; the swap happens in diffusers' `dispatch_attention_fn`
    as `WanAttnProcessor` calls it, after norm and RoPE, exactly what the attention sees.
    """

    def __init__(self, model, monkeypatch):
        self.layer, self.recorded, self.swap_rows = None, {}, None
        modules = [(("main", i), b.attn1) for i, b in enumerate(model.blocks)]
        modules += [(("vace", i), b.attn1) for i, b in enumerate(model.vace_blocks)]
        for name, module in modules:
            module.register_forward_pre_hook(lambda m, args, name=name: setattr(self, "layer", name))
            module.register_forward_hook(lambda m, args, out: setattr(self, "layer", None))
        stock = transformer_wan.dispatch_attention_fn
        monkeypatch.setattr(transformer_wan, "dispatch_attention_fn",
                            lambda q, k, v, **kw: stock(q, *self.kv(k, v), **kw))

    def kv(self, key, value):
        if self.layer is None:  # cross-attention
            return key, value
        if self.swap_rows is None:
            self.recorded[self.layer] = (key.clone(), value.clone())
            return key, value
        old_key, old_value = self.recorded[self.layer]
        keep = torch.zeros(key.shape[1], dtype=torch.bool)
        keep[self.swap_rows] = True
        keep = keep.view(1, -1, 1, 1)
        return torch.where(keep, key, old_key), torch.where(keep, value, old_value)


@contextlib.contextmanager
def block_stack_ends(model):
    """Records h_in (the first main block's input) and h_out (norm_out's input) of each forward."""
    ends = {}
    handles = [model.blocks[0].register_forward_pre_hook(lambda m, args, kw: ends.__setitem__("in", kw.get(
        "hidden_states", args[0] if args else None)), with_kwargs=True),
        model.norm_out.register_forward_pre_hook(lambda m, args: ends.__setitem__("out", args[0]))]
    try:
        yield ends
    finally:
        for handle in handles:
            handle.remove()


def forward(model, inputs, t):
    with torch.no_grad(), model.cache_context("cond"):
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


@pytest.mark.parametrize("layers", [dict(num_layers=4, vace_layers=(0, 2)), dict(num_layers=5, vace_layers=(0, 4))],
                         ids=["vace-every-2nd", "vace-last-layer"])
@pytest.mark.parametrize("selection", ["kmeans_attention", "uniform"])
def test_partial_step_matches_stock_forward_with_swapped_kv(layers, selection, monkeypatch):
    first, second = tiny_inputs(0), tiny_inputs(1)
    second["encoder_hidden_states"] = first["encoder_hidden_states"]  # one prompt per video, as in a pipeline

    engine_model = tiny_transformer(**layers)
    config = hetcache.HetCacheConfig(plan="FP", margin=1, margin_ratio=0.5, context_ratio=0.25, selection=selection)
    hetcache.enable(engine_model, config, mask=box_mask(GRID, slice(1, 3), slice(2, 4)))
    forward(engine_model, first, T_FULL)
    partial = forward(engine_model, second, T_PARTIAL)
    rows = engine_of(engine_model).session.step_rows[1]
    assert hetcache.stats(engine_model).plan == "FP"
    assert 0 < rows.numel() < 72

    reference_model = tiny_transformer(**layers)
    kv = SelfAttentionKV(reference_model, monkeypatch)
    with block_stack_ends(reference_model) as ends:
        forward(reference_model, first, T_FULL)
        residual = ends["out"] - ends["in"]
        kv.swap_rows = rows
        rebuilt = forward(reference_model, second, T_PARTIAL)
        hidden_in = ends["in"]
    assert len(kv.recorded) == len(reference_model.blocks) + len(reference_model.vace_blocks)

    outside = torch.ones(72, dtype=torch.bool)
    outside[rows] = False
    with torch.no_grad():
        held = output_head(reference_model, hidden_in + residual, T_PARTIAL, second["encoder_hidden_states"], GRID)
    assert (token_rows(partial)[rows] - token_rows(rebuilt)[rows]).abs().max() <= TOL
    assert (token_rows(partial)[outside] - token_rows(held)[outside]).abs().max() <= TOL
    # The swap matters: without it the rows of S differ (so the test can fail).
    with torch.no_grad():
        kv.swap_rows = None
        dense = forward(reference_model, second, T_PARTIAL)
    assert (token_rows(partial)[rows] - token_rows(dense)[rows]).abs().max() > 100 * TOL
