"""DESIGN section 6 properties of the engine on tiny random transformers (float32, CPU).

Tolerances: 1e-5 absolute where rows are recomputed (the engine's matmuls see fewer rows than the stock ones
and may round differently); exact equality where values are copied (REUSE, disable).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from torch.utils.flop_counter import FlopCounterMode
from tiny_models import box_mask, output_head, tiny_inputs, tiny_transformer, token_rows

import hetcache
from hetcache.engine import HetCacheEngine
from hetcache.hooks import engine_of

TOL = 1e-5
GRID = (3, 4, 6)
CONFIGS = [dict(num_layers=4, vace_layers=(0, 2)), dict(num_layers=5, vace_layers=(0, 4))]


def call(model, inputs, t, branch="cond"):
    with torch.no_grad(), model.cache_context(branch):
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


def stock(model, inputs, t):
    with torch.no_grad():
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


def cfg(**overrides):
    """Config with a 1-token margin, so the tiny grid keeps context tokens."""
    return hetcache.HetCacheConfig(**{"margin": 1, **overrides})


def mask():
    return box_mask(GRID, slice(1, 3), slice(2, 4))


@pytest.fixture(params=CONFIGS, ids=["vace-every-2nd", "vace-last-layer"])
def model(request):
    return tiny_transformer(**request.param)


def test_full_plan_reproduces_stock(model):
    steps = [(tiny_inputs(seed), t) for seed, t in enumerate((900.0, 700.0, 400.0))]
    expected = [stock(model, x, t) for x, t in steps]
    hetcache.enable(model, cfg(plan="FFF"), mask=mask())
    for (x, t), ref in zip(steps, expected):
        assert (call(model, x, t) - ref).abs().max() <= TOL
    assert hetcache.stats(model).plan == "FFF"


def test_full_steps_of_a_partial_plan_match_stock(model):
    """With PARTIAL steps ahead, FULL steps run the engine's own block maths (keeping K/V): still the stock output."""
    steps = [(tiny_inputs(seed), t) for seed, t in enumerate((900.0, 700.0))]
    expected = [stock(model, x, t) for x, t in steps]
    hetcache.enable(model, cfg(plan="FFP"), mask=mask())
    for (x, t), ref in zip(steps, expected):
        assert (call(model, x, t) - ref).abs().max() <= TOL
    assert engine_of(model).branches["cond"].cache.layer("main", 0).key is not None


def test_full_only_plan_is_bitwise_stock(model):
    x = tiny_inputs(4)
    expected = stock(model, x, 500.0)
    hetcache.enable(model, cfg(plan="FF"), mask=mask())
    call(model, x, 900.0)
    assert torch.equal(call(model, x, 500.0), expected)


def test_partial_with_all_rows_equals_full(model):
    first, second = tiny_inputs(0), tiny_inputs(1)
    expected = stock(model, second, 500.0)
    config = cfg(plan="FP", margin_ratio=1.0, context_ratio=1.0)
    hetcache.enable(model, config, mask=mask())
    call(model, first, 900.0)
    out = call(model, second, 500.0)
    assert hetcache.stats(model).plan == "FP"
    assert hetcache.stats(model).rows == [72, 72]
    assert (out - expected).abs().max() <= TOL


def test_partial_after_full_on_same_inputs_reproduces_rows(model):
    x = tiny_inputs(3)
    hetcache.enable(model, cfg(plan="FP", context_ratio=0.2), mask=mask())
    full = call(model, x, 600.0)
    partial = call(model, x, 600.0)
    engine = engine_of(model)
    rows = engine.session.step_rows[1]
    assert 0 < rows.numel() < 72
    assert (token_rows(partial)[rows] - token_rows(full)[rows]).abs().max() <= TOL
    # Rows outside S come from h_in + R of the same inputs: the whole output matches.
    assert (partial - full).abs().max() <= TOL


def test_reuse_is_input_plus_residual_and_runs_no_block(model):
    first, second = tiny_inputs(0), tiny_inputs(1)
    hetcache.enable(model, cfg(plan="FR"), mask=mask())
    call(model, first, 900.0)
    residual = engine_of(model).branches["cond"].cache.residual.clone()
    ffn_calls = []
    handles = [m.ffn.register_forward_hook(lambda *a: ffn_calls.append(1)) for m in (*model.blocks, *model.vace_blocks)]
    out = call(model, second, 800.0)
    for handle in handles:
        handle.remove()
    assert ffn_calls == []
    with torch.no_grad():
        hidden_in = model.patch_embedding(second["hidden_states"]).flatten(2).transpose(1, 2)
        expected = output_head(model, hidden_in + residual, 800.0, second["encoder_hidden_states"], GRID)
    assert torch.equal(out, expected)


def test_disable_restores_stock_exactly(model):
    x = tiny_inputs(5)
    expected = stock(model, x, 300.0)
    hetcache.enable(model, cfg(plan="FPR"), mask=mask())
    for t in (900.0, 600.0, 300.0):
        call(model, x, t)
    hetcache.disable(model)
    assert torch.equal(stock(model, x, 300.0), expected)
    assert not hasattr(model.blocks[0], "_diffusers_hook") or model.blocks[0]._diffusers_hook.get_hook("hetcache") is None


def test_cond_and_uncond_caches_stay_apart(model):
    cond, uncond = tiny_inputs(0), tiny_inputs(0)
    uncond["encoder_hidden_states"] = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(9))
    config = cfg(plan="FR")
    hetcache.enable(model, config, mask=mask())
    call(model, cond, 900.0, "cond")
    call(model, uncond, 900.0, "uncond")
    both = call(model, cond, 700.0, "cond")
    hetcache.enable(model, config, mask=mask())
    call(model, cond, 900.0, "cond")
    alone = call(model, cond, 700.0, "cond")
    assert torch.equal(both, alone)
    assert hetcache.stats(model).branches == {"cond": "FR"}


@pytest.mark.parametrize("kind", ["F", "P", "R"])
def test_analytic_flops_match_flop_counter(model, kind):
    x = tiny_inputs(2)
    hetcache.enable(model, cfg(plan="F" + kind, context_ratio=0.3), mask=mask())
    with attention_backend("_native_math"):
        counter = FlopCounterMode(display=False)
        with counter:
            call(model, x, 900.0)
        first = hetcache.stats(model).flops
        assert abs(counter.get_total_flops() - first) <= 0.02 * first
        counter = FlopCounterMode(display=False)
        with counter:
            call(model, x, 700.0)
        second = hetcache.stats(model).flops - first
    assert abs(counter.get_total_flops() - second) <= 0.02 * max(second, 1.0)


def test_batch_of_two_is_refused(model):
    x = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in tiny_inputs(0).items()}
    hetcache.enable(model, cfg(plan="F"), mask=mask())
    with pytest.raises(ValueError, match="batch size 1"):
        call(model, x, 900.0)


def test_missing_mask_is_explained(model):
    hetcache.enable(model, cfg(plan="FP"))
    with pytest.raises(ValueError, match="mask"):
        call(model, tiny_inputs(0), 900.0)


def test_timestep_level_plans_need_no_mask(model):
    x = tiny_inputs(0)
    hetcache.enable(model, cfg(plan="FRF"))
    for t in (900.0, 800.0, 700.0):
        call(model, x, t)
    assert hetcache.stats(model).plan == "FRF"
    assert hetcache.stats(model).tokens["generative"] == 72


def test_ema_blends_non_generative_rows(model):
    x, y = tiny_inputs(0), tiny_inputs(1)
    config = cfg(plan="FP", margin_ratio=1.0, context_ratio=1.0, ema_alpha=0.5)
    hetcache.enable(model, config, mask=mask())
    call(model, x, 900.0)
    before = engine_of(model).branches["cond"].cache.residual.clone()
    call(model, y, 800.0)
    engine = engine_of(model)
    after = engine.branches["cond"].cache.residual
    gen = engine.session.partition.generative
    context = engine.session.partition.context
    hetcache.enable(model, cfg(plan="FP", margin_ratio=1.0, context_ratio=1.0), mask=mask())
    call(model, x, 900.0)
    call(model, y, 800.0)
    fresh = engine_of(model).branches["cond"].cache.residual
    assert (after[:, gen] - fresh[:, gen]).abs().max() <= TOL
    expected = 0.5 * before[:, context] + 0.5 * fresh[:, context]
    assert (after[:, context] - expected).abs().max() <= TOL


@pytest.mark.parametrize("dtype, bytes_per_value, tolerance", [(torch.bfloat16, 2, 5e-3), (torch.float8_e4m3fn, 1, 5e-2)])
def test_cache_dtype_shrinks_the_caches(model, dtype, bytes_per_value, tolerance):
    def run(config):
        hetcache.enable(model, config, mask=mask())
        outs = [call(model, tiny_inputs(i), t) for i, t in enumerate((900.0, 800.0, 700.0, 600.0))]
        cache = engine_of(model).branches["cond"].cache
        text = sum(k.nbytes + v.nbytes for k, v in cache.text_kv.values())
        assert cache.residual.dtype == torch.float32  # the residual keeps the compute dtype
        # text K/V and the residual stay in the compute dtype: the rest is K/V
        return outs[-1], hetcache.stats(model).cache_bytes - text - cache.residual.nbytes

    reference, full_bytes = run(cfg(plan="FPRP"))
    out, small_bytes = run(cfg(plan="FPRP", cache_dtype=dtype))
    assert small_bytes == full_bytes * bytes_per_value // 4
    assert (out - reference).norm() / reference.norm() < tolerance


def test_cuda_graph_mode_keeps_buffers_in_place_and_outputs_unchanged(model, monkeypatch):
    """While graphs are active, FULL steps write K/V and the residual into the buffers PARTIAL graphs read by
    address; the outputs stay bitwise those of the eager mode (on the CPU no graph is captured)."""
    steps = [(tiny_inputs(seed), t) for seed, t in enumerate((900.0, 800.0, 700.0, 600.0))]
    monkeypatch.setattr(HetCacheEngine, "_use_graphs", lambda self, device: self.config.cuda_graphs)

    def run(graphs):
        hetcache.enable(model, cfg(plan="FPFP", cuda_graphs=graphs), mask=mask())
        state = lambda: engine_of(model).branches["cond"].cache  # noqa: E731
        outputs, addresses = [], []
        for x, t in steps:
            outputs.append(call(model, x, t))
            addresses.append((state().layer("main", 0).key.data_ptr(), state().layer("vace", 0).value.data_ptr(),
                              state().residual.data_ptr()))
        assert hetcache.stats(model).plan == "FPFP"
        return outputs, addresses

    default, _ = run(False)
    graphed, addresses = run(True)
    assert all(torch.equal(a, b) for a, b in zip(default, graphed))
    assert len(set(addresses)) == 1  # the second FULL step wrote into the first one's buffers


def test_rows_handed_to_a_graph_drive_the_whole_call(model):
    """`use_rows` (what a CUDA-graph capture calls) makes the rows, the EMA weights and the RoPE rows of the call
    derive from the graph's buffer, so a replay with new rows in that buffer follows them."""
    hetcache.enable(model, cfg(plan="FP", ema_alpha=0.5), mask=mask())
    engine = engine_of(model)
    call(model, tiny_inputs(0), 900.0)
    engine.begin_call(tiny_inputs(1)["hidden_states"], torch.tensor([500.0]),
                      tiny_inputs(1)["encoder_hidden_states"], engine.branches["cond"], "cond")
    rows, blend = engine.ctx.rows, engine.ctx.update.blend
    assert engine.ctx.kind == "P" and blend is not None and 0 < int((blend > 0).sum()) < rows.numel()
    buffer = rows.clone()
    engine.use_rows(buffer)
    assert engine.ctx.rows is buffer and engine.ctx.update.index is buffer
    assert engine.ctx.update.blend is not blend and torch.equal(engine.ctx.update.blend, blend)
    assert engine.ctx.rope is None and engine.session.rope_rows == {}
    engine.end_call()


def test_graphs_only_where_partial_steps_are_small(model):
    """CUDA graphs are used on a GPU for videos whose PARTIAL steps compute at most MAX_ROW_SHARE of the tokens."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only compared, never allocated on

    def decision(config, device, box=mask()):
        hetcache.enable(model, config, mask=box)
        engine = engine_of(model)
        call(model, tiny_inputs(0), 900.0)
        return engine._use_graphs(device)

    small = cfg(plan="FP", margin=0, margin_ratio=0.0, context_ratio=0.0)  # 4 x 3 generative tokens of 72
    assert decision(small, cuda) and not decision(small, cpu)
    assert not decision(cfg(plan="FP", margin=0, margin_ratio=0.0, context_ratio=0.0, cuda_graphs=False), cuda)
    assert not decision(cfg(plan="FF"), cuda)  # no PARTIAL step
    assert not decision(cfg(plan="FP"), cuda, box_mask(GRID, slice(0, 3), slice(0, 4)))  # 36 of 72 tokens


def test_low_precision_cache_leaves_full_and_reuse_steps_exact(model):
    """Only stored K/V copies take `cache_dtype`: a FULL step attends to what it just computed and the residual stays
    in the compute dtype, so with a float8 cache FULL and REUSE outputs are those of the full-precision cache, bit
    for bit (the PARTIAL step, which reads stored K/V rows, is the one that changes)."""
    x = tiny_inputs(7)

    def run(dtype):
        hetcache.enable(model, cfg(plan="FRP", cache_dtype=dtype), mask=mask())
        return [call(model, x, t) for t in (900.0, 900.0, 800.0)]

    full_precision, float8 = run(None), run(torch.float8_e4m3fn)
    assert torch.equal(full_precision[0], float8[0]) and torch.equal(full_precision[1], float8[1])
    assert not torch.equal(full_precision[2], float8[2])


@pytest.mark.parametrize("how", ["enable", "set_mask"])
def test_a_numpy_mask_works_as_a_torch_mask(model, how):
    """README's example passes `prepare_inputs(...).mask`, a numpy bool array, to enable (issue 17 item 10)."""
    outputs = {}
    for kind, pixels in (("torch", mask()), ("numpy", mask().numpy())):
        config = cfg(plan="FP", context_ratio=0.2)
        hetcache.enable(model, config, mask=pixels if how == "enable" else None)
        if how == "set_mask":
            hetcache.set_mask(model, pixels)
        outputs[kind] = [call(model, tiny_inputs(seed), t) for seed, t in ((0, 900.0), (1, 500.0))]
        outputs[kind].append(hetcache.stats(model).tokens)
        assert hetcache.plan_for(model, 2, config, mask=pixels) == "FP"
        hetcache.disable(model)
    assert isinstance(mask().numpy(), np.ndarray)
    assert all(torch.equal(a, b) for a, b in zip(outputs["torch"][:2], outputs["numpy"][:2]))
    assert outputs["torch"][2] == outputs["numpy"][2]
