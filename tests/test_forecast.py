"""Forecasts of cached values (hetcache/forecast.py) and the engine's `reuse` modes (float32/float64, CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import box_mask, output_head as head, tiny_inputs, tiny_transformer

import hetcache
from hetcache.forecast import ORDERS, RowHistory, SampleTimes
from hetcache.hooks import engine_of

GRID = (3, 4, 6)
TIMES = [999.0, 937.5, 801.25, 640.0, 512.5, 333.3]  # unevenly spaced, like a shifted flow schedule


def polynomial(order: int, t: torch.Tensor) -> torch.Tensor:
    """A per-row polynomial of degree `order` in t: [1, N, 3] values for times t [N]."""
    rows = torch.arange(t.numel(), dtype=torch.float64)
    t = t / 1000.0
    out = torch.stack([1.0 + rows * 0.1 + t * (0.5 - rows * 0.01) + (t**2) * (0.3 if order == 2 else 0.0)
                       + k * t for k in range(3)], dim=-1)
    return out.unsqueeze(0)


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolation_is_exact_on_polynomials_with_uneven_steps(order):
    """Rows refreshed at different steps (as PARTIAL steps do) each extrapolate from their own sample times."""
    n = 6
    times = SampleTimes(order + 1, n, torch.device("cpu"))
    history = RowHistory(order + 1, torch.zeros(1, n, 3, dtype=torch.float64), torch.float64)
    schedule = [(TIMES[0], None), (TIMES[1], torch.tensor([0, 2, 4])), (TIMES[2], None), (TIMES[3], torch.tensor([1, 4])),
                (TIMES[4], None)]
    for t, rows in schedule:
        values = polynomial(order, torch.full((n,), t, dtype=torch.float64))
        history.push(rows, values if rows is None else values.index_select(1, rows))
        times.push(rows, torch.tensor([t], dtype=torch.float64))
    assert len({tuple(times.times[:, row].tolist()) for row in range(n)}) > 1  # rows hold different sample times
    target = TIMES[5]
    weights = times.weights(torch.tensor([target], dtype=torch.float64))
    forecast = history.forecast(weights, torch.float64)
    expected = polynomial(order, torch.full((n,), target, dtype=torch.float64))
    assert torch.allclose(forecast, expected, rtol=0, atol=1e-9)
    assert torch.allclose(weights.sum(0), torch.ones(n, dtype=torch.float64), atol=1e-6)  # constants reproduced


def test_rows_with_fewer_samples_fall_back_to_lower_orders():
    times = SampleTimes(3, 3, torch.device("cpu"))
    times.push(None, torch.tensor([900.0]))
    assert times.weights(torch.tensor([500.0]))[:, 0].tolist() == [0.0, 0.0, 1.0]  # hold
    times.push(torch.tensor([1]), torch.tensor([800.0]))
    w = times.weights(torch.tensor([700.0]))
    assert w[:, 1].tolist() == [0.0, -1.0, 2.0]  # linear through 900 and 800
    assert w[:, 0].tolist() == [0.0, 0.0, 1.0]  # row 0 still has one sample


def call(model, inputs, t, branch="cond"):
    with torch.no_grad(), model.cache_context(branch):
        return model(timestep=torch.tensor([t]), return_dict=False, **inputs)[0]


@pytest.mark.parametrize("reuse", list(ORDERS))
def test_reuse_modes_agree_until_a_forecast_has_two_samples(reuse):
    """With one computed sample every mode holds it: a plan F R P gives the same outputs in every mode, and FULL
    steps are the stock forward in every mode."""
    model = tiny_transformer()
    mask = box_mask(GRID, slice(1, 3), slice(2, 4))
    outputs = {}
    for mode in ("hold", reuse):
        hetcache.enable(model, hetcache.HetCacheConfig(plan="FRP", margin=1, reuse=mode), mask=mask)
        outputs[mode] = [call(model, tiny_inputs(i), t) for i, t in enumerate((900.0, 800.0, 700.0))]
        hetcache.disable(model)
    assert all(torch.equal(a, b) for a, b in zip(outputs["hold"], outputs[reuse]))


@pytest.mark.parametrize("reuse", ["linear", "quadratic"])
def test_reuse_returns_head_of_input_plus_extrapolated_residual(reuse):
    """A REUSE step after computed steps returns head(h_in + R_hat), R_hat the Lagrange extrapolation (in the
    timestep) of the residuals of the computed steps, rebuilt here by hand."""
    model = tiny_transformer()
    mask = box_mask(GRID, slice(1, 3), slice(2, 4))
    steps = [(tiny_inputs(i), t) for i, t in enumerate((900.0, 850.0, 700.0, 500.0))]
    plan = "FFFR" if reuse == "quadratic" else "FFR"
    hetcache.enable(model, hetcache.HetCacheConfig(plan=plan, margin=1, reuse=reuse), mask=mask)
    residuals, outputs = [], []
    for x, t in steps[: len(plan)]:
        outputs.append(call(model, x, t))
        residuals.append(engine_of(model).branches["cond"].cache.residual_history.latest().clone())
    assert hetcache.stats(model).plan == plan
    hetcache.disable(model)
    computed = len(plan) - 1
    times = [t for _, t in steps[:computed]]
    target = steps[computed][1]
    expected_residual = torch.zeros_like(residuals[0], dtype=torch.float64)
    for k in range(computed):
        basis = 1.0
        for j in range(computed):
            if j != k:
                basis *= (target - times[j]) / (times[k] - times[j])
        expected_residual += basis * residuals[k].double()
    x = steps[computed][0]
    with torch.no_grad():
        hidden_in = model.patch_embedding(x["hidden_states"]).flatten(2).transpose(1, 2)
        expected = head(model, hidden_in + expected_residual.float(), target, x["encoder_hidden_states"], GRID)
    assert (outputs[-1] - expected).abs().max() <= 1e-4
    # and it is not the hold answer
    with torch.no_grad():
        held = head(model, hidden_in + residuals[computed - 1], target, x["encoder_hidden_states"], GRID)
    assert (outputs[-1] - held).abs().max() > 1e-3


def test_forecast_keeps_one_more_sample_per_order():
    model = tiny_transformer()
    mask = box_mask(GRID, slice(1, 3), slice(2, 4))
    sizes = {}
    for reuse in ORDERS:
        hetcache.enable(model, hetcache.HetCacheConfig(plan="FP", margin=1, reuse=reuse), mask=mask)
        call(model, tiny_inputs(0), 900.0)
        call(model, tiny_inputs(1), 800.0)
        cache = engine_of(model).branches["cond"].cache
        text = sum(k.nbytes + v.nbytes for k, v in cache.text_kv.values())
        sizes[reuse] = hetcache.stats(model).cache_bytes - text
        hetcache.disable(model)
    assert sizes["linear"] == 2 * sizes["hold"] and sizes["quadratic"] == 3 * sizes["hold"]
