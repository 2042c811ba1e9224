"""Rows a PARTIAL step recomputes: all generative tokens, a rotating share of the margin, a few context tokens.

Context tokens are chosen from k-means clusters of their last-block hidden states (so every kind of context keeps
fresh keys and values) and, inside a cluster, by how much attention the generative queries pay them. Everything
runs on the tensors' device without host syncs, so selection never stalls the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hetcache.tokens import TokenPartition

SELECTION_STRATEGIES = ("kmeans_attention", "kmeans", "attention", "uniform", "random")


def context_count(num_context: int, ratio: float) -> int:
    """ceil(ratio * num_context), clamped to [0, num_context]."""
    return _share(num_context, ratio)


def margin_rows(margin: torch.Tensor, ratio: float, phase: int) -> torch.Tensor:
    """ceil(ratio * |M|) margin tokens, evenly spaced along M and shifted by `phase` positions.

    M is in (t, h, w) order, so even spacing along it gives every latent frame (and every row run) its share within
    one token. Consecutive picks lie at most ceil(1 / ratio) positions apart and the pattern moves one position per
    phase, so any ceil(1 / ratio) consecutive phases together cover every margin token. `phase` counts the PARTIAL
    steps before this one.
    """
    if phase < 0:
        raise ValueError(f"phase {phase} must be >= 0")
    total = margin.numel()
    count = _share(total, ratio)
    if count == total:
        return margin
    positions = (_evenly_spaced(total, count, margin.device) + phase % total) % total
    return margin[positions.sort().values]


def kmeans(features: torch.Tensor, k: int, *, iters: int = 8, seed: int = 0, max_points: int | None = None) -> torch.Tensor:
    """Cluster labels int64 [n] of features [n, D] by `iters` Lloyd iterations after a k-means++ start.

    Runs on the features' device in float32 with no host sync: the seeding draws from a generator seeded with
    `seed` on that device, the iteration count is fixed and centre updates are matmuls (deterministic on GPU).
    An empty cluster keeps its centre. k >= n gives every point its own label. With `max_points`, the centres
    are fitted on that many evenly spaced points and then every point is assigned to its nearest centre: 16
    centres are well placed by a few thousand points, and the fit's cost stops growing with the video.
    """
    if k < 1:
        raise ValueError(f"k = {k}: need at least one cluster")
    count = features.shape[0]
    if count <= k:
        return torch.arange(count, device=features.device)
    all_points = features.float()
    all_points = all_points - all_points.mean(dim=0)  # centring keeps the expanded distance form accurate in float32
    all_norms = all_points.square().sum(dim=1)
    points, norms = all_points, all_norms
    if max_points is not None and count > max_points:
        sample = _evenly_spaced(count, max(max_points, k), features.device)
        points, norms = all_points.index_select(0, sample), all_norms.index_select(0, sample)
    centres = _kmeanspp_centres(points, k, seed)
    cluster_ids = torch.arange(k, device=points.device)
    for _ in range(iters):
        members = (_nearest(points, norms, centres)[:, None] == cluster_ids).float()
        sizes = members.sum(dim=0)[:, None]
        centres = torch.where(sizes > 0, (members.T @ points) / sizes.clamp_min(1.0), centres)
    return _nearest(all_points, all_norms, centres)


def interaction_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    *,
    scale: float | None = None,
    chunk: int = 2048,
    max_queries: int | None = None,
    gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention mass that the generative queries place on each key: float32 [N].

    s_j = mean over heads of sum over i of softmax_i(q_i . K^T * scale)_j, the softmax over all N keys. queries are
    [H, G, Dh], keys [H, N, Dh] (after norm and RoPE; bf16 accepted); `head_mass` gives the per-head sums.
    With `max_queries`, the sum over queries is estimated from that many evenly spaced queries, scaled by
    G / max_queries: the scores only rank context tokens, and the cost then stops growing with the mask.
    `gather_heads`: under context parallelism a rank holds some of the heads; this function returns every rank's
    per-head sums [H_all, N] from this rank's [H, N], and the mean is over all heads, as in one process.
    """
    heads, num_queries, head_dim = queries.shape
    if keys.ndim != 3 or keys.shape[0] != heads or keys.shape[2] != head_dim:
        raise ValueError(f"keys {tuple(keys.shape)} do not match queries {tuple(queries.shape)}: expected [H, N, Dh]")
    if chunk < 1:
        raise ValueError(f"chunk {chunk} must be >= 1")
    if num_queries == 0 or keys.shape[1] == 0:
        return torch.zeros(keys.shape[1], dtype=torch.float32, device=keys.device)
    if max_queries is not None and num_queries > max_queries:
        sample = _evenly_spaced(num_queries, max_queries, queries.device)
        estimate = interaction_scores(queries.index_select(1, sample), keys, scale=scale, chunk=chunk,
                                      gather_heads=gather_heads)
        return estimate * (num_queries / max_queries)
    mass = head_mass(queries, keys, scale=scale, chunk=chunk)
    return (mass if gather_heads is None else gather_heads(mass)).mean(dim=0)


def head_mass(queries: torch.Tensor, keys: torch.Tensor, *, scale: float | None = None,
              chunk: int = 2048) -> torch.Tensor:
    """Per head, the attention mass all `queries` [H, G, Dh] place on each of the `keys` [H, N, Dh]: float32 [H, N].

    Keys are visited in chunks twice: once for each query's log-sum-exp, once for the per-key mass, so memory stays
    at H x G x chunk float32 values. On the GPU, bf16/fp16 inputs get their logits from float16 matmuls (float32
    accumulation; about 1e-3 relative error per logit, harmless for ranking) and everything after in float32: this
    keeps the scores at a few milliseconds per FULL step at the real size instead of tens with float32 matmuls.
    """
    heads, num_queries, head_dim = queries.shape
    num_keys = keys.shape[1]
    mass = torch.zeros(heads, num_keys, dtype=torch.float32, device=keys.device)
    low_precision = keys.device.type == "cuda" and queries.dtype in (torch.bfloat16, torch.float16)
    matmul_dtype = torch.float16 if low_precision else torch.float32
    scaled = (queries.float() * (head_dim**-0.5 if scale is None else scale)).to(matmul_dtype)
    keys = keys.to(matmul_dtype)
    starts = range(0, num_keys, chunk)
    lse = torch.full((heads, num_queries), -math.inf, dtype=torch.float32, device=keys.device)
    for start in starts:
        logits = (scaled @ keys[:, start : start + chunk].transpose(1, 2)).float()
        lse = torch.logaddexp(lse, logits.logsumexp(dim=-1))
    for start in starts:
        logits = (scaled @ keys[:, start : start + chunk].transpose(1, 2)).float()
        mass[:, start : start + chunk] = logits.sub_(lse[..., None]).exp_().sum(dim=1)
    return mass


def context_rows(
    context: torch.Tensor,
    count: int,
    *,
    strategy: str,
    labels: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose `count` context tokens; returns their sorted global indices.

    `context` holds global token indices, `labels` [|C|] cluster ids in [0, |C|) aligned with it (from `kmeans`),
    `scores` [N] interaction scores indexed by global token. Strategies:
    "kmeans_attention": cluster quotas (see `_cluster_quotas`), the highest-scoring members of each cluster;
    "kmeans": the same quotas, members evenly spaced inside each cluster;
    "attention": the `count` highest scores; "uniform": evenly spaced over C; "random": a subset drawn with `generator`.
    """
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}: choose one of {', '.join(SELECTION_STRATEGIES)}")
    if strategy in ("kmeans_attention", "kmeans") and labels is None:
        raise ValueError(f"context strategy {strategy!r} needs cluster labels")
    if strategy in ("kmeans_attention", "attention") and scores is None:
        raise ValueError(f"context strategy {strategy!r} needs interaction scores")
    if labels is not None and labels.shape != context.shape:
        raise ValueError(f"labels {tuple(labels.shape)} are not aligned with context {tuple(context.shape)}")
    total = context.numel()
    if count >= total:
        return context.sort().values
    if count <= 0:
        return context[:0]
    if strategy == "uniform":
        positions = _evenly_spaced(total, count, context.device)
    elif strategy == "random":
        device = context.device if generator is None else generator.device
        positions = torch.randperm(total, generator=generator, device=device)[:count].to(context.device)
    elif strategy == "attention":
        positions = scores[context].topk(count).indices
    else:
        positions = _cluster_picks(labels, count, scores[context] if strategy == "kmeans_attention" else None)
    return context[positions].sort().values


def partial_rows(
    partition: TokenPartition,
    *,
    margin_ratio: float,
    context_ratio: float,
    phase: int,
    context_choice: torch.Tensor,
) -> torch.Tensor:
    """Sorted rows of a PARTIAL step: all of G, the phase's margin rows and `context_choice`.

    `context_choice` must hold context_count(|C|, context_ratio) context tokens (checked on sizes only).
    """
    expected = context_count(partition.context.numel(), context_ratio)
    if context_choice.numel() != expected:
        raise ValueError(
            f"context_choice has {context_choice.numel()} rows but context_ratio {context_ratio} of "
            f"{partition.context.numel()} context tokens asks for {expected}"
        )
    margin = margin_rows(partition.margin, margin_ratio, phase)
    rows = torch.cat([partition.generative, margin, context_choice.to(partition.generative.device)])
    return rows.sort().values


def _share(total: int, ratio: float) -> int:
    """ceil(ratio * total) in [0, total], ignoring float noise (0.3 * 10 is 3, not 4)."""
    if not ratio >= 0:
        raise ValueError(f"ratio {ratio} must be >= 0")
    exact = ratio * total
    nearest = round(exact)
    count = nearest if abs(exact - nearest) <= 1e-9 * max(1.0, exact) else math.ceil(exact)
    return min(total, count)


def _evenly_spaced(total: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` distinct positions in [0, total) at the centres of equal strata: floor((2j + 1) * total / (2 count))."""
    strata = torch.arange(count, device=device)
    return ((2 * strata + 1) * total) // (2 * count)


def _kmeanspp_centres(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Greedy k-means++ seeding: each step draws a few candidates with probability proportional to their squared
    distance to the chosen centres and keeps the one that lowers the total squared distance most.

    Draws use the Gumbel-top-k trick on device noise, so no index leaves the device. Chosen points have distance 0
    and are not drawn again unless fewer than k distinct points exist.
    """
    candidates = min(points.shape[0], 2 + int(math.log(k)))
    generator = torch.Generator(device=points.device).manual_seed(seed)
    uniform = torch.rand(k, points.shape[0], generator=generator, device=points.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    # rows are taken with index_select and 1-element index tensors: indexing by a 0-d tensor would sync the host
    chosen = [points.index_select(0, gumbel[0].argmax().view(1))]
    nearest = (points - chosen[0]).square().sum(dim=1)
    for draw in gumbel[1:]:
        drawn = points[(nearest.log() + draw).topk(candidates).indices]
        distances = torch.cdist(drawn, points, compute_mode="donot_use_mm_for_euclid_dist")
        reach = torch.minimum(nearest, distances.square())
        best = reach.sum(dim=1).argmin().view(1)
        chosen.append(drawn.index_select(0, best))
        nearest = reach.index_select(0, best)[0]
    return torch.cat(chosen)


def _nearest(points: torch.Tensor, norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre per point, from ||x||^2 - 2 x.c + ||c||^2 (one matmul)."""
    distances = norms[:, None] - 2.0 * points @ centres.T + centres.square().sum(dim=1)[None, :]
    return distances.argmin(dim=1)


def _cluster_picks(labels: torch.Tensor, count: int, scores: torch.Tensor | None) -> torch.Tensor:
    """Positions (into the context list) of `count` picks spread over clusters by `_cluster_quotas`.

    Members are grouped by cluster with stable sorts; with `scores` a cluster's picks are its highest-scoring
    members, without them its members evenly spaced in context order.
    """
    total = labels.numel()
    labels = labels.long()
    if scores is None:
        order = torch.argsort(labels, stable=True)
    else:
        by_score = torch.argsort(scores, descending=True, stable=True)
        order = by_score[torch.argsort(labels[by_score], stable=True)]
    sizes = torch.zeros(total, dtype=torch.long, device=labels.device).index_add_(
        0, labels, torch.ones_like(labels)
    )
    quotas = _cluster_quotas(sizes, count)
    quota_ends = quotas.cumsum(dim=0)
    slots = torch.arange(count, device=labels.device)
    cluster = torch.searchsorted(quota_ends, slots, right=True)
    rank = slots - (quota_ends - quotas)[cluster]
    if scores is None:
        rank = ((2 * rank + 1) * sizes[cluster]) // (2 * quotas[cluster])
    return order[(sizes.cumsum(dim=0) - sizes)[cluster] + rank]


def _cluster_quotas(sizes: torch.Tensor, count: int) -> torch.Tensor:
    """Picks per cluster, summing to `count` (< total size): one for every non-empty cluster when `count` allows,
    the rest shared in proportion to size (minus that one) by largest remainders, ties to the lower cluster id.
    No quota exceeds its cluster's size."""
    nonempty = (sizes > 0).long()
    guaranteed = nonempty * (nonempty.sum() <= count)
    weights = sizes - guaranteed
    rest = count - guaranteed.sum()
    scaled = weights * rest
    whole = weights.sum().clamp_min(1)
    base = scaled // whole
    leftover = rest - base.sum()
    by_remainder = torch.argsort(scaled - base * whole, descending=True, stable=True)
    extra = torch.zeros_like(sizes).index_copy_(
        0, by_remainder, (torch.arange(sizes.numel(), device=sizes.device) < leftover).long()
    )
    return guaranteed + base + extra
