"""Self-attention of a few query rows against all keys, with the keys split so the GPU's last wave fills.

A PARTIAL step's self-attention runs n selected query rows against all N keys. A flash kernel gives each thread
block one tile of query rows of one head, so it launches ceil(n / tile) x heads blocks; they run in waves of one
block per multiprocessor, and each wave costs about as much as a full one. On an H100 with cuDNN's kernel (128
query rows per tile, 132 multiprocessors, 12 heads) the time is flat from 1,472 to 2,816 rows
(docs/BENCHMARKS.md): at 2,160 rows 204 blocks take two waves where 1.55 would do.

Split-KV fills the waves: the keys are cut into S equal chunks that run as S batch entries of one kernel call
(S times the blocks, each over N / S keys), and the chunk outputs are merged exactly by their log-sum-exps.
`kv_splits` picks S from the wave count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# cuDNN's Hopper flash kernel (sm90, head_dim 128) processes 128 query rows per thread block (the steps in the
# attention sweep of docs/BENCHMARKS.md fall every 11 x 128 rows at 12 heads on 132 multiprocessors).
QUERY_TILE = 128
MAX_SPLITS = 6
MIN_CHUNK_KEYS = 2048  # shorter chunks spend more of each block on loading its query tile than on keys
MIN_GAIN = 0.1  # split only when the wave model predicts at least this saving

ChunkAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def waves(rows: int, heads: int, multiprocessors: int, splits: int = 1) -> float:
    """Full-length waves of thread blocks that attention of `rows` query rows takes with `splits` key chunks."""
    blocks = math.ceil(rows / QUERY_TILE) * heads * splits
    return math.ceil(blocks / multiprocessors) / splits


def kv_splits(rows: int, tokens: int, heads: int, multiprocessors: int) -> int:
    """How many key chunks make attention of `rows` query rows over `tokens` keys cheapest (1 = no split).

    Only splits into equal chunks (S divides `tokens`) of at least MIN_CHUNK_KEYS keys count, and a split must
    save at least MIN_GAIN of the waves.
    """
    if rows <= 0 or multiprocessors <= 0:
        return 1
    unsplit = waves(rows, heads, multiprocessors)
    best, best_waves = 1, unsplit
    for splits in range(2, MAX_SPLITS + 1):
        if tokens % splits or tokens // splits < MIN_CHUNK_KEYS:
            continue
        cost = waves(rows, heads, multiprocessors, splits)
        if cost < best_waves:
            best, best_waves = splits, cost
    return best if best_waves <= (1.0 - MIN_GAIN) * unsplit else 1


def cudnn_chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention of [B, H, n, D] tensors with its log-sum-exp: (out [B, H, n, D], lse [B, H, n])."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(query, key, value, None, True)[:2]
    return out, lse.reshape(out.shape[:-1])


def split_kv_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    splits: int,
    chunk_attention: ChunkAttention | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for query [1, n, H, D] over key, value [1, N, H, D], keys in `splits` chunks.

    Each chunk's output is normalised within the chunk; weighting the chunks by the softmax of their
    log-sum-exps restores the softmax over all keys. Returns [1, n, H, D] in the query's dtype.
    `chunk_attention` maps [S, H, n, D] chunks to (out, lse); the default is cuDNN's kernel.
    """
    batch, tokens, heads, head_dim = key.shape
    if batch != 1 or tokens % splits:
        raise ValueError(f"split-KV needs batch 1 and {splits} equal chunks, got keys of shape {tuple(key.shape)}")
    # [1, N, H, D] -> [S, H, N / S, D] as strided views: no copy of the keys and values.
    chunk_key = key.view(splits, tokens // splits, heads, head_dim).transpose(1, 2)
    chunk_value = value.view(splits, tokens // splits, heads, head_dim).transpose(1, 2)
    chunk_query = query.transpose(1, 2).expand(splits, -1, -1, -1).contiguous()
    out, lse = (chunk_attention or cudnn_chunk_attention)(chunk_query, chunk_key, chunk_value)
    weights = torch.softmax(lse.float(), dim=0).unsqueeze(-1)  # [S, H, n, 1]
    merged = (weights * out.float()).sum(0, keepdim=True)
    return merged.transpose(1, 2).to(query.dtype)
