"""Analytic cost model of WanVACETransformer3DModel, so every step kind has a cost beside its measured time.

Counts matmul-type work only (linear layers, attention products, convolutions) at 2 FLOPs per multiply-add:
the same work `torch.utils.flop_counter.FlopCounterMode` counts. Elementwise work (norms, modulation, RoPE,
activations, softmax, biases) is left out; it is a few percent at most. Batch size 1: one CFG branch per call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a WanVACETransformer3DModel that its cost depends on."""

    dim: int
    heads: int
    ffn_dim: int
    num_layers: int
    num_vace_layers: int
    text_dim: int
    in_channels: int
    vace_in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int]
    freq_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape from `WanVACETransformer3DModel.config` (a FrozenDict, a dict or an object)."""

        def get(name: str) -> Any:
            return config[name] if isinstance(config, Mapping) else getattr(config, name)

        heads = int(get("num_attention_heads"))
        in_channels = int(get("in_channels"))
        return cls(
            dim=heads * int(get("attention_head_dim")),
            heads=heads,
            ffn_dim=int(get("ffn_dim")),
            num_layers=int(get("num_layers")),
            num_vace_layers=len(get("vace_layers")),
            text_dim=int(get("text_dim")),
            in_channels=in_channels,
            vace_in_channels=int(get("vace_in_channels")),
            # the model falls back to in_channels when out_channels is unset
            out_channels=int(get("out_channels") or in_channels),
            patch_size=tuple(int(p) for p in get("patch_size")),
            freq_dim=int(get("freq_dim")),
        )


def block_flops(shape: ModelShape, rows: int, keys: int, text_len: int, *, text_kv: bool) -> float:
    """One main block with `rows` computed rows attending to `keys` self-attention keys.

    Self-attention Q, K, V, O projections of the computed rows (8 rows D^2), scores and weighted sum against
    all keys (4 rows keys D), cross-attention q and out projections (4 rows D^2) and attention to the text
    (4 rows L D), the text K/V projections (4 L D^2) only when `text_kv` (not cached), FFN (4 rows D F).
    """
    d, n = shape.dim, rows
    flops = 8 * n * d * d + 4 * n * keys * d
    flops += 4 * n * d * d + 4 * n * text_len * d
    if text_kv:
        flops += 4 * text_len * d * d
    flops += 4 * n * d * shape.ffn_dim
    return float(flops)


def vace_block_flops(
    shape: ModelShape, rows: int, keys: int, text_len: int, *, text_kv: bool, first: bool
) -> float:
    """One VACE block: a main block plus its hint projection proj_out, and proj_in on the first VACE block."""
    projections = 2 if first else 1
    return block_flops(shape, rows, keys, text_len, text_kv=text_kv) + projections * 2 * rows * shape.dim**2


def embed_flops(shape: ModelShape, tokens: int, text_len: int) -> float:
    """Work outside the blocks, done on every call whatever the step kind.

    Patch embeddings of the latents and of the VACE control (stride == kernel convolutions: one kernel
    application per token), the condition embedder (time MLP freq->D->D, time_proj D->6D, and the text
    projection text_dim->D->D on every text token), and the head proj_out D -> out_channels * prod(patch).
    """
    d, patch = shape.dim, math.prod(shape.patch_size)
    patch_embed = 2 * tokens * d * patch * (shape.in_channels + shape.vace_in_channels)
    time_embed = 2 * shape.freq_dim * d + 2 * d * d + 2 * d * 6 * d
    text_embed = 2 * text_len * shape.text_dim * d + 2 * text_len * d * d
    head = 2 * tokens * d * shape.out_channels * patch
    return float(patch_embed + time_embed + text_embed + head)


def reuse_flops(shape: ModelShape, tokens: int) -> float:
    """A REUSE call (`engine.reuse_forward`): latent patch embedding, time embedding MLP, head."""
    d, patch = shape.dim, math.prod(shape.patch_size)
    patch_embed = 2 * tokens * d * patch * shape.in_channels
    time_embed = 2 * shape.freq_dim * d + 2 * d * d
    head = 2 * tokens * d * shape.out_channels * patch
    return float(patch_embed + time_embed + head)


def forward_flops(shape: ModelShape, tokens: int, rows: int, text_len: int, *, text_kv: bool) -> float:
    """One transformer call: embedding and head on all `tokens`, every block on `rows` computed rows.

    rows = tokens for FULL, the selected count for PARTIAL, 0 for REUSE (`reuse_flops`: the engine then runs
    only the latent patch embedding, the time embedding and the head). Keys are always all `tokens` (PARTIAL
    attends to the cached K/V of the others).
    """
    if rows == 0:
        return reuse_flops(shape, tokens)
    main = shape.num_layers * block_flops(shape, rows, tokens, text_len, text_kv=text_kv)
    vace = sum(
        vace_block_flops(shape, rows, tokens, text_len, text_kv=text_kv, first=i == 0)
        for i in range(shape.num_vace_layers)
    )
    return embed_flops(shape, tokens, text_len) + main + vace


def selection_flops(
    shape: ModelShape, tokens: int, generative: int, context: int, *, clusters: int, iters: int,
    fit_points: int | None = None,
) -> float:
    """Work done at a FULL step to choose the context tokens of the following PARTIAL steps.

    Interaction scores: the generative queries against all `tokens` keys of the last main block, in two
    passes (a logsumexp pass, then a pass that sums the normalised attention mass per key), each computing
    the logits again: 2 passes x 2 generative tokens D. The queries and keys themselves come from that
    block's FULL computation and cost nothing extra; the exponentials and sums are elementwise.
    k-means (`select.kmeans`): per Lloyd iteration two matmuls of 2 context clusters D each (point-to-centre
    distances, and the one-hot membership times the points for the new centres), plus the final assignment.
    With `fit_points`, the iterations run on at most that many points and only the final assignment sees all.
    """
    scores = 2 * 2 * generative * tokens * shape.dim
    if context <= clusters:
        return float(scores)
    fitted = context if fit_points is None else min(context, max(fit_points, clusters))
    kmeans = (2 * iters * fitted + context) * 2 * clusters * shape.dim
    return float(scores + kmeans)
