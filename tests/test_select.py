"""Row selection for PARTIAL steps: margin rotation, k-means, interaction scores, context strategies."""

import math
from fractions import Fraction

import pytest
import torch

from hetcache.select import (
    SELECTION_STRATEGIES,
    context_count,
    context_rows,
    interaction_scores,
    kmeans,
    margin_rows,
    partial_rows,
)
from hetcache.tokens import partition_tokens, token_coverage


def exact_ceil(ratio: float, total: int) -> int:
    return min(total, math.ceil(Fraction(str(ratio)) * total))


def moving_box_partition():
    """Nine latent frames whose box (and so margin ring) grows: margins of different sizes per frame."""
    mask = torch.zeros(33, 20 * 16, 24 * 16, dtype=torch.bool)
    for f in range(33):
        side = 16 + 4 * f
        mask[f, 40 : 40 + side, 60 : 60 + side] = True
    return partition_tokens(token_coverage(mask, (20, 24)), margin=3)


# margin rows


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("total", [1, 2, 7, 10, 100, 470, 4230])
def test_margin_rows_count_and_refresh_within_ceil_inverse_ratio_phases(ratio, total):
    margin = torch.arange(total) * 3 + 5
    count = exact_ceil(ratio, total)
    window = math.ceil(1 / ratio)
    for start in (0, 1, 6, 997):
        seen = torch.zeros(total, dtype=torch.bool)
        for phase in range(start, start + window):
            rows = margin_rows(margin, ratio, phase)
            assert rows.numel() == count
            assert torch.equal(rows, rows.unique())  # sorted, no duplicates
            seen |= torch.isin(margin, rows)
            assert torch.isin(rows, margin).all()
        assert seen.all()


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9])
def test_margin_rows_give_each_frame_its_share_within_one_token(ratio):
    partition = moving_box_partition()
    margin = partition.margin
    frame_of = margin // (20 * 24)
    per_frame = torch.bincount(frame_of, minlength=9).double()
    assert (per_frame > 0).all() and per_frame.unique().numel() > 3
    share = per_frame * exact_ceil(ratio, margin.numel()) / margin.numel()
    for phase in range(12):
        picked = torch.bincount(margin_rows(margin, ratio, phase) // (20 * 24), minlength=9).double()
        assert ((picked - share).abs() < 1).all()


def test_margin_rows_edge_ratios():
    margin = torch.arange(10, 40)
    assert torch.equal(margin_rows(margin, 1.0, 3), margin)
    assert torch.equal(margin_rows(margin, 1.5, 3), margin)
    assert margin_rows(margin, 0.0, 3).numel() == 0
    assert margin_rows(margin[:0], 0.5, 3).numel() == 0
    assert margin_rows(torch.arange(10), 0.3, 0).numel() == 3  # 0.3 * 10 is 3, not float-noise 4
    with pytest.raises(ValueError):
        margin_rows(margin, 0.5, -1)
    with pytest.raises(ValueError):
        margin_rows(margin, -0.1, 0)


# k-means


def blobs(seed=0, per_blob=40, dim=8):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(5, dim) * 20.0
    truth = torch.arange(5).repeat_interleave(per_blob)
    points = centres[truth] + torch.randn(truth.numel(), dim, generator=generator)
    shuffle = torch.randperm(truth.numel(), generator=generator)
    return points[shuffle], truth[shuffle]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_recovers_well_separated_blobs(seed):
    points, truth = blobs(seed)
    labels = kmeans(points, 5, seed=seed)
    assert labels.dtype == torch.int64 and labels.shape == truth.shape
    pairs = torch.unique(torch.stack([truth, labels]), dim=1)
    assert pairs.shape[1] == 5 and pairs[1].unique().numel() == 5  # a bijection between blobs and clusters


def test_kmeans_is_deterministic_for_a_seed():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(kmeans(points, 6, seed=11), kmeans(points, 6, seed=11))


def test_kmeans_small_and_degenerate_inputs():
    points = torch.randn(5, 3)
    assert torch.equal(kmeans(points, 5), torch.arange(5))
    assert torch.equal(kmeans(points, 9), torch.arange(5))
    assert kmeans(points[:0], 4).numel() == 0
    same = kmeans(torch.ones(20, 4), 3)  # fewer distinct points than clusters: no NaN, valid labels
    assert same.shape == (20,) and ((same >= 0) & (same < 3)).all()
    assert kmeans(blobs()[0].bfloat16(), 5).shape == (200,)
    with pytest.raises(ValueError):
        kmeans(points, 0)


# interaction scores


def brute_force_scores(queries, keys, scale):
    logits = queries.double() @ keys.double().transpose(1, 2) * scale
    return torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0)


@pytest.mark.parametrize("chunk", [1, 7, 16, 61, 64, 500])
def test_interaction_scores_match_a_full_softmax(chunk):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 9, 16, generator=generator) * 2
    keys = torch.randn(3, 61, 16, generator=generator) * 2
    scores = interaction_scores(queries, keys, chunk=chunk)
    reference = brute_force_scores(queries, keys, 16**-0.5)
    assert scores.dtype == torch.float32 and scores.shape == (61,)
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=0)
    assert math.isclose(scores.sum().item(), 9, rel_tol=1e-5)  # each query spreads a mass of one


def test_interaction_scores_custom_scale_and_bf16_input():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(2, 5, 8, generator=generator).bfloat16()
    keys = torch.randn(2, 30, 8, generator=generator).bfloat16()
    scores = interaction_scores(queries, keys, scale=0.7, chunk=8)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), brute_force_scores(queries, keys, 0.7), rtol=1e-5, atol=0)


def test_interaction_scores_without_queries_are_zero_and_shapes_are_checked():
    assert torch.equal(interaction_scores(torch.zeros(2, 0, 8), torch.randn(2, 12, 8)), torch.zeros(12))
    with pytest.raises(ValueError):
        interaction_scores(torch.zeros(2, 3, 8), torch.randn(3, 12, 8))


# context rows


def context_setup(total=120, clusters=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    context = torch.randperm(3 * total, generator=generator)[:total].sort().values
    labels = torch.randint(0, clusters, (total,), generator=generator)
    labels[labels == clusters - 1] = 0  # an empty cluster id among the used ones
    labels[:3] = clusters  # and a tiny cluster
    scores = torch.rand(3 * total, generator=generator)
    return context, labels, scores


def reference_quotas(sizes: list[int], count: int) -> list[int]:
    """One per non-empty cluster when count allows, the rest by largest remainder of size - 1 (ties: lower id)."""
    nonempty = [int(s > 0) for s in sizes]
    guaranteed = nonempty if sum(nonempty) <= count else [0] * len(sizes)
    weights = [s - g for s, g in zip(sizes, guaranteed)]
    rest = count - sum(guaranteed)
    exact = [Fraction(w * rest, sum(weights)) for w in weights]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(exact[c] - quotas[c]), c))
    for c in by_remainder[: rest - sum(quotas)]:
        quotas[c] += 1
    return [g + q for g, q in zip(guaranteed, quotas)]


@pytest.mark.parametrize("strategy", SELECTION_STRATEGIES)
@pytest.mark.parametrize("count", [0, 1, 4, 6, 7, 37, 119, 120, 500])
def test_context_rows_counts_sorted_subset(strategy, count):
    context, labels, scores = context_setup()
    rows = context_rows(context, count, strategy=strategy, labels=labels, scores=scores,
                        generator=torch.Generator().manual_seed(3))
    assert rows.numel() == min(count, 120) and rows.dtype == torch.int64
    assert torch.equal(rows, rows.unique())
    assert torch.isin(rows, context).all()


@pytest.mark.parametrize("strategy", ["kmeans_attention", "kmeans"])
@pytest.mark.parametrize("count", [1, 4, 6, 7, 37, 119])
def test_cluster_quotas_are_proportional_and_sum_to_count(strategy, count):
    context, labels, scores = context_setup()
    rows = context_rows(context, count, strategy=strategy, labels=labels, scores=scores)
    cluster_of_row = labels[torch.searchsorted(context, rows)]
    sizes = torch.bincount(labels, minlength=6).tolist()
    picked = torch.bincount(cluster_of_row, minlength=6).tolist()
    assert picked == reference_quotas(sizes, count)
    assert sum(picked) == count
    nonempty = [s for s in sizes if s]
    if count >= len(nonempty):
        for size, got in zip(sizes, picked):
            if size:
                share = (size - 1) * (count - len(nonempty)) / (120 - len(nonempty))
                assert got >= 1 and abs(got - 1 - share) < 1


@pytest.mark.parametrize("count", [5, 20, 60])
def test_kmeans_attention_takes_the_top_scores_of_each_cluster(count):
    context, labels, scores = context_setup(seed=4)
    rows = set(context_rows(context, count, strategy="kmeans_attention", labels=labels, scores=scores).tolist())
    for cluster in labels.unique().tolist():
        members = [int(t) for t, c in zip(context, labels) if c == cluster]
        quota = sum(1 for t in members if t in rows)
        best = sorted(members, key=lambda t: -scores[t].item())[:quota]
        assert {t for t in members if t in rows} == set(best)


def test_kmeans_strategy_spreads_picks_inside_each_cluster():
    context = torch.arange(200)
    labels = torch.arange(200) % 2  # two interleaved clusters of 100
    rows = context_rows(context, 20, strategy="kmeans", labels=labels)
    for cluster in (0, 1):
        members = rows[labels[rows] == cluster] // 2  # rank inside the cluster
        assert members.numel() == 10
        assert set(members.diff().tolist()) == {10}


def test_attention_strategy_takes_the_top_scores():
    context, _, scores = context_setup(seed=5)
    rows = context_rows(context, 17, strategy="attention", scores=scores)
    best = context[scores[context].argsort(descending=True)[:17]].sort().values
    assert torch.equal(rows, best)


def test_uniform_strategy_is_evenly_spaced():
    rows = context_rows(torch.arange(100) * 2, 10, strategy="uniform")
    assert torch.equal(rows, torch.arange(5, 100, 10) * 2)


def test_random_strategy_is_deterministic_for_a_seeded_generator():
    context = torch.arange(1000)
    first = context_rows(context, 50, strategy="random", generator=torch.Generator().manual_seed(9))
    again = context_rows(context, 50, strategy="random", generator=torch.Generator().manual_seed(9))
    other = context_rows(context, 50, strategy="random", generator=torch.Generator().manual_seed(10))
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize(
    ("strategy", "needs"),
    [("kmeans_attention", "labels"), ("kmeans_attention", "scores"), ("kmeans", "labels"), ("attention", "scores")],
)
def test_context_rows_missing_inputs_raise(strategy, needs):
    context, labels, scores = context_setup()
    given = {"labels": labels, "scores": scores}
    given[needs] = None
    with pytest.raises(ValueError, match=needs):
        context_rows(context, 5, strategy=strategy, **given)


def test_context_rows_rejects_unknown_strategy_and_misaligned_labels():
    context, labels, scores = context_setup()
    with pytest.raises(ValueError, match="strategy"):
        context_rows(context, 5, strategy="best")
    with pytest.raises(ValueError, match="aligned"):
        context_rows(context, 5, strategy="kmeans", labels=labels[:-1])


# partial rows and counts


def test_context_count_is_a_noise_free_ceiling():
    assert context_count(6300, 0.05) == 315
    assert context_count(10, 0.3) == 3
    assert context_count(10, 0.31) == 4
    assert context_count(0, 0.5) == 0
    assert context_count(7, 2.0) == 7


@pytest.mark.parametrize("phase", [0, 1, 5])
def test_partial_rows_hold_all_generative_rows_sorted_without_duplicates(phase):
    partition = moving_box_partition()
    count = context_count(partition.context.numel(), 0.1)
    choice = context_rows(partition.context, count, strategy="uniform")
    rows = partial_rows(partition, margin_ratio=0.7, context_ratio=0.1, phase=phase, context_choice=choice)
    assert torch.isin(partition.generative, rows).all()
    assert torch.isin(choice, rows).all()
    assert torch.equal(rows, rows.unique())
    margin_picked = torch.isin(rows, partition.margin).sum().item()
    assert margin_picked == exact_ceil(0.7, partition.margin.numel())
    assert rows.numel() == partition.generative.numel() + margin_picked + count
    with pytest.raises(ValueError, match="context_choice"):
        partial_rows(partition, margin_ratio=0.7, context_ratio=0.2, phase=phase, context_choice=choice)


def test_interaction_scores_estimate_from_a_query_sample():
    generator = torch.Generator().manual_seed(11)
    queries = torch.randn(2, 40, 8, generator=generator)
    keys = torch.randn(2, 30, 8, generator=generator)
    assert torch.equal(interaction_scores(queries, keys, max_queries=40), interaction_scores(queries, keys))
    sample = ((2 * torch.arange(10) + 1) * 40) // 20  # the evenly spaced queries the estimate uses
    expected = interaction_scores(queries[:, sample], keys) * 4.0
    assert torch.allclose(interaction_scores(queries, keys, max_queries=10), expected, rtol=1e-6)


def test_kmeans_fitted_on_a_sample_still_labels_every_point():
    generator = torch.Generator().manual_seed(12)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    points = torch.cat([c + torch.randn(200, 2, generator=generator) for c in centres])
    labels = kmeans(points, 3, seed=1, max_points=60)
    assert labels.shape == (600,)
    for blob in range(3):
        assert labels[blob * 200 : (blob + 1) * 200].unique().numel() == 1
    assert labels.unique().numel() == 3
    assert torch.equal(kmeans(points, 3, seed=1, max_points=600), kmeans(points, 3, seed=1))
