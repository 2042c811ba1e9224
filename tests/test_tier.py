"""The host tier of the cache (hetcache/tier.py) on the CPU, with copies done at once (the stand-in for streams):
outputs equal the device tier's bit for bit, and the copies follow the schedule (fetch ahead, two working buffers,
write-back after every layer)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import box_mask, tiny_inputs, tiny_transformer

import hetcache
from hetcache.hooks import engine_of
from hetcache.tier import spread

GRID = (3, 4, 6)
TIMES = (900.0, 800.0, 700.0, 600.0, 500.0)


def call(model, inputs, t, branch):
    with torch.no_grad(), model.cache_context(branch):
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


def run(model, config, plan):
    hetcache.enable(model, hetcache.HetCacheConfig(plan=plan, margin=1, context_ratio=0.2, **config),
                    mask=box_mask(GRID, slice(1, 3), slice(2, 4)))
    outputs, logs = [], []
    text = tiny_inputs(0)["encoder_hidden_states"]
    for i, t in enumerate(TIMES[: len(plan)]):
        x = dict(tiny_inputs(i), encoder_hidden_states=text)
        for branch in ("cond", "uncond"):
            outputs.append(call(model, dict(x, encoder_hidden_states=text if branch == "cond" else -text), t, branch))
        tier = engine_of(model).store.host
        logs.append(list(tier.transfers.log) if tier is not None else [])
        if tier is not None:
            tier.transfers.log.clear()
    stats = hetcache.stats(model)
    hetcache.disable(model)
    return outputs, logs, stats


@pytest.mark.parametrize("config", [{}, {"reuse": "linear"}, {"ema_alpha": 0.4}, {"cache_dtype": torch.bfloat16},
                                    {"host_share": 0.5}], ids=["hold", "linear", "ema", "bf16", "half-on-host"])
def test_host_tier_outputs_equal_the_device_tier_bitwise(config):
    model = tiny_transformer(num_layers=4, vace_layers=(0, 2))
    device, _, _ = run(model, config, "FPRPF")
    host, logs, stats = run(model, {**config, "cache_device": "cpu"}, "FPRPF")
    assert all(torch.equal(a, b) for a, b in zip(device, host))
    assert any("cache on the host" in note for note in stats.notes)
    assert any(logs)


def test_copies_follow_the_schedule():
    """FULL: no fetch, every layer written back in execution order. PARTIAL: each host layer fetched before the
    layer before it is written back (so the fetch runs while that layer computes), then written back itself."""
    model = tiny_transformer(num_layers=4, vace_layers=(0, 2))
    _, logs, _ = run(model, {"cache_device": "cpu"}, "FPR")
    order = [("vace", 0), ("vace", 1), ("main", 0), ("main", 1), ("main", 2), ("main", 3)]
    full, partial, reuse = logs
    per_branch = len(order)
    assert full == [("write_back", key) for key in order] * 2  # cond, then uncond
    assert reuse == []  # a REUSE step moves nothing
    expected = [("fetch", order[0])]
    for k, key in enumerate(order):
        if k + 1 < len(order):
            expected.append(("fetch", order[k + 1]))
        expected.append(("write_back", key))
    assert partial[:2 * per_branch] == expected and partial[2 * per_branch:] == expected


def test_two_working_buffer_sets_whatever_the_layer_count():
    model = tiny_transformer(num_layers=6, vace_layers=(0, 2, 4))
    hetcache.enable(model, hetcache.HetCacheConfig(plan="FP", margin=1, cache_device="cpu"),
                    mask=box_mask(GRID, slice(1, 3), slice(2, 4)))
    for i, t in enumerate(TIMES[:2]):
        call(model, tiny_inputs(i), t, "cond")
    tier = engine_of(model).store.host
    assert len(tier.pool) == 2 and all(buffers is not None for buffers in tier.pool)
    assert tier.in_use == {} and tier.staged == {}
    hetcache.disable(model)


def test_spread_places_host_layers_evenly():
    order = [("main", i) for i in range(8)]
    assert spread(order, 0) == set() and spread(order, 8) == set(order)
    assert sorted(i for _, i in spread(order, 4)) == [1, 3, 5, 7]
    assert sorted(i for _, i in spread(order, 2)) == [2, 6]
