"""The cache store: the one place that owns what HetCache keeps between steps, per CFG branch.

Per branch (`BranchCache`): each main and VACE layer's self-attention K (after norm and RoPE) and V of every token,
the text K/V of each cross-attention (step-invariant, made once per text), and the residual R = h_out - h_in of
the whole block stack. `CacheStore` decides their dtype (`cache_dtype`) and whether FULL steps write into the
existing buffers (in place, which CUDA graphs need because they read by address) or replace them.
"""

from __future__ import annotations

import torch

from hetcache.sparse import LayerKV, blend_rows, text_key_value


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class BranchCache:
    """The buffers of one CFG branch."""

    def __init__(self) -> None:
        self.kv: dict[tuple[str, int], LayerKV] = {}  # ("main" | "vace", layer) -> K/V of every token
        self.text_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_source: torch.Tensor | None = None  # the text the text K/V were made from
        self.residual: torch.Tensor | None = None  # [1, N, dim]

    def layer(self, kind: str, layer: int) -> LayerKV:
        """The K/V of main (`kind` "main") or VACE ("vace") layer `layer` (empty before the first FULL step)."""
        return self.kv.setdefault((kind, layer), LayerKV())

    def nbytes(self) -> int:
        total = sum(kv.nbytes() for kv in self.kv.values())
        total += sum(_bytes(k) + _bytes(v) for k, v in self.text_kv.values())
        return total + _bytes(self.residual)


class CacheStore:
    """Allocation and dtype of every branch's buffers."""

    def __init__(self, cache_dtype: torch.dtype | None, heads: int) -> None:
        self.cache_dtype = cache_dtype
        self.heads = heads

    def layer_kv(self, cache: BranchCache, kind: str, layer: int, hidden: torch.Tensor, num_tokens: int,
                 in_place: bool) -> LayerKV:
        """The layer's K/V. In place mode allocates them here, once per video, so the block maths always writes
        into existing tensors (and compiled code sees one kind of argument)."""
        kv = cache.layer(kind, layer)
        if in_place:
            shape = (hidden.shape[0], num_tokens, self.heads, hidden.shape[-1] // self.heads)
            dtype = self.cache_dtype or hidden.dtype
            if kv.key is None or kv.key.shape != shape or kv.key.dtype != dtype:
                kv.key = torch.empty(shape, dtype=dtype, device=hidden.device)
                kv.value = torch.empty_like(kv.key)
        return kv

    def text_kv(self, cache: BranchCache, kind: str, layer: int, attn: torch.nn.Module,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention K/V of `text` for one layer, made at the layer's first use."""
        if (kind, layer) not in cache.text_kv:
            cache.text_kv[(kind, layer)] = text_key_value(attn, text)
        return cache.text_kv[(kind, layer)]

    def use_text(self, cache: BranchCache, text: torch.Tensor) -> bool:
        """Make `text` the branch's text; True when it replaced another one (its text K/V are dropped)."""
        if cache.text_source is text:
            return False
        cache.text_kv.clear()
        cache.text_source = text
        return True

    def keep_residual(self, cache: BranchCache, residual: torch.Tensor, compute_dtype: torch.dtype,
                      in_place: bool) -> None:
        """Store a FULL step's residual of every token."""
        dtype = self.cache_dtype or compute_dtype
        kept = cache.residual
        if in_place and kept is not None and kept.shape == residual.shape and kept.dtype == dtype:
            kept.copy_(residual)
        else:
            cache.residual = residual.to(dtype)

    @staticmethod
    def update_residual_rows(cache: BranchCache, rows: torch.Tensor, fresh: torch.Tensor,
                             blend: torch.Tensor | None) -> None:
        """Refresh the residual of the rows a PARTIAL step computed (blended with EMA weights when given)."""
        blend_rows(cache.residual, rows, fresh, blend)
