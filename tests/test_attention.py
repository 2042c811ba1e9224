"""Split-KV attention: exact merge of key chunks, the wave model that picks the split, its use in PARTIAL steps."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import box_mask, tiny_inputs, tiny_transformer

import hetcache
from hetcache import attention
from hetcache.engine import engine_of


def reference_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of [B, H, n, D] chunks by the textbook formula: what cuDNN's kernel returns, on the CPU."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    return torch.softmax(scores, -1) @ value, scores.logsumexp(-1)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv_equals_attention_over_all_keys(splits):
    generator = torch.Generator().manual_seed(splits)
    query = torch.randn(1, 7, 3, 16, generator=generator, dtype=torch.float64)
    key = 3 * torch.randn(1, 30, 3, 16, generator=generator, dtype=torch.float64)  # peaked softmax per chunk
    value = torch.randn(1, 30, 3, 16, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
    got = attention.split_kv_attention(query, key, value, splits, reference_chunks)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-6  # the merge runs in float32


def test_split_kv_refuses_unequal_chunks():
    q, kv = torch.zeros(1, 4, 2, 8), torch.zeros(1, 10, 2, 8)
    with pytest.raises(ValueError, match="equal chunks"):
        attention.split_kv_attention(q, kv, kv, 3, reference_chunks)


def test_waves_count_thread_blocks_per_multiprocessor():
    # 11 tiles of 128 rows x 12 heads = 132 blocks: one wave on 132 multiprocessors; one row more starts a second.
    assert attention.waves(1408, 12, 132) == 1
    assert attention.waves(1409, 12, 132) == 2
    assert attention.waves(2160, 12, 132) == 2  # 17 tiles: 204 blocks
    assert attention.waves(2160, 12, 132, splits=3) == pytest.approx(5 / 3)  # 612 blocks of a third of the keys


def test_kv_splits_fills_the_last_wave_only_when_it_pays():
    splits = attention.kv_splits(2160, 14_040, 12, 132)  # r = 0.15 at 480x832x33: two waves, 1.55 needed
    assert splits > 1 and 14_040 % splits == 0
    assert attention.waves(2160, 12, 132, splits) <= 0.9 * attention.waves(2160, 12, 132)
    assert attention.kv_splits(1408, 14_040, 12, 132) == 1  # exactly one full wave
    assert attention.kv_splits(14_040, 14_040, 12, 132) == 1  # 1,320 blocks: ten full waves
    assert attention.kv_splits(2160, 14_033, 12, 132) == 1  # prime token count: no equal chunks
    assert attention.kv_splits(2160, 3_000, 12, 132) == 1  # chunks would be shorter than MIN_CHUNK_KEYS
    assert attention.kv_splits(0, 14_040, 12, 132) == 1


def test_engine_does_not_split_on_the_cpu():
    model = tiny_transformer()
    hetcache.enable(model, hetcache.HetCacheConfig(plan="FP", margin=1), mask=box_mask((3, 4, 6), slice(1, 3), slice(2, 4)))
    assert engine_of(model)._kv_splits(10, torch.device("cpu")) == 1


def test_partial_step_with_split_keys_matches_one_call(monkeypatch):
    """The engine's PARTIAL step gives the same output whether its self-attention splits the keys or not."""
    mask = box_mask((3, 4, 6), slice(1, 3), slice(2, 4))
    inputs = [tiny_inputs(0), tiny_inputs(1)]

    def run(splits: int) -> torch.Tensor:
        model = tiny_transformer()
        hetcache.enable(model, hetcache.HetCacheConfig(plan="FP", margin=1, context_ratio=0.2), mask=mask)
        engine_of(model)._kv_splits = lambda rows, device: splits
        with torch.no_grad():
            outputs = []
            for x, t in zip(inputs, (900.0, 500.0)):
                with model.cache_context("cond"):
                    outputs.append(model(timestep=torch.tensor([t]), return_dict=False, **x)[0])
        assert hetcache.stats(model).plan == "FP"
        return outputs[-1]

    monkeypatch.setattr(attention, "cudnn_chunk_attention", reference_chunks)
    one_call, split = run(1), run(3)  # 72 tokens: three chunks of 24 keys
    assert (split - one_call).abs().max() <= 1e-5
