"""One Wan block (main or VACE) on a subset of token rows, with a per-layer self-attention K/V buffer.

Everything in a Wan block except self-attention's keys and values is per token: modulation, norms, Q/K/V
projections, RoPE, cross-attention and the FFN. So a block can run on the selected rows S only, provided the
queries of S attend to the keys and values of ALL N tokens. Those come from a buffer holding every token's K
(after norm and RoPE) and V from the last step that computed them; the fresh rows of S are written into it
before attention. With S = all tokens and an empty buffer this is exactly the stock block.

The maths follows diffusers' `WanTransformerBlock.forward`, `WanVACETransformerBlock.forward` and
`WanAttnProcessor` (diffusers 0.42), using the blocks' own sub-modules; attention goes through diffusers'
`dispatch_attention_fn` so the user's attention backend is honoured. Under context parallelism a `RowShard`
(`hetcache.shard`) runs the self-attention: the rows are this rank's share, and the K/V buffer has its heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from hetcache import compat

if TYPE_CHECKING:
    from hetcache.shard import RowShard
    from hetcache.store import LayerKV, RowUpdate


@dataclass
class RowRope:
    """RoPE tables for the rows being computed: [1, n, 1, head_dim / 2] each, in float32."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_rotary_emb(cls, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> RowRope:
        """Half-size tables from diffusers' interleaved (cos, sin) pair; float32 instead of float64."""
        freqs_cos, freqs_sin = rotary_emb
        return cls(freqs_cos[..., 0::2].float().contiguous(), freqs_sin[..., 1::2].float().contiguous())

    def rows(self, index: torch.Tensor | None) -> RowRope:
        if index is None:
            return self
        return RowRope(self.cos.index_select(1, index), self.sin.index_select(1, index))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs of `x` [B, n, heads, head_dim].

        The products promote to float32 inside each kernel and the results are written straight into an
        output of x's dtype: no float32 copy of x and no stacked intermediate (those cost about 3 % of a
        FULL step at the real size).
        """
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * self.cos - x2 * self.sin
        out[..., 1::2] = x1 * self.sin + x2 * self.cos
        return out


def text_key_value(attn: torch.nn.Module, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values of the text: step-invariant, so computed once per video and branch."""
    if attn.add_k_proj is not None:
        raise NotImplementedError("hetcache does not support image-conditioned (I2V) cross-attention")
    if attn.fused_projections:
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    key = attn.norm_k(key)
    return key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))


def qkv_projections(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention query, key and value projections of rows `x`, fused (`fuse_projections`) or not, as
    `WanAttnProcessor` makes them."""
    if attn.fused_projections:
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def attention(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention of `query` to `key` / `value` ([B, n, heads, head_dim]) with the backend the user chose for `attn`."""
    return dispatch_attention_fn(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=compat.attention_backend(attn)
    )


def _project_out(attn: torch.nn.Module, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    out = out.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


def _attend(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _project_out(attn, attention(attn, query, key, value), query)


def _self_attention(
    attn: torch.nn.Module,
    x: torch.Tensor,
    rope: RowRope,
    kv: LayerKV,
    update: RowUpdate,
    probe: Callable[[torch.Tensor, torch.Tensor], None] | None,
    shard: RowShard | None,
) -> torch.Tensor:
    query, key, value = qkv_projections(attn, x)
    query = rope.apply(attn.norm_q(query).unflatten(2, (attn.heads, -1)))
    key = rope.apply(attn.norm_k(key).unflatten(2, (attn.heads, -1)))
    value = value.unflatten(2, (attn.heads, -1))
    if shard is not None:
        return _project_out(attn, shard.attend(attn, query, key, value, kv, update, probe), query)
    keys, values = kv.exchange(key, value, update)
    if probe is not None:
        probe(query, keys)
    out = _attend(attn, query, keys, values)
    kv.settle(key, value, update)
    return out


def block_rows(
    block: torch.nn.Module,
    x: torch.Tensor,
    temb: torch.Tensor,
    rope: RowRope,
    kv: LayerKV,
    text_kv: tuple[torch.Tensor, torch.Tensor],
    update: RowUpdate,
    probe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    shard: RowShard | None = None,
) -> torch.Tensor:
    """The body shared by main and VACE blocks, on rows `x` [B, n, dim]: self-attn, cross-attn, FFN.

    `probe(query, keys)` sees this layer's queries of the rows and the keys of all tokens (after norm and RoPE);
    the engine uses it in the last block to score context tokens. `shard`: this rank's share of the rows under
    context parallelism (its self-attention runs through diffusers' Ulysses all-to-alls).
    """
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table.to(temb.device) + temb.float()).chunk(6, 1)

    normed = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    attn_out = _self_attention(block.attn1, normed, rope, kv, update, probe, shard)
    x = (x.float() + attn_out * gate).type_as(x)

    attn2 = block.attn2
    normed = block.norm2(x.float()).type_as(x)
    query = attn2.norm_q(attn2.to_q(normed)).unflatten(2, (attn2.heads, -1))
    x = x + _attend(attn2, query, *text_kv)

    normed = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    ff_out = block.ffn(normed)
    return (x.float() + ff_out.float() * c_gate).type_as(x)


def vace_block_rows(
    block: torch.nn.Module,
    hidden_rows: torch.Tensor,
    control_rows: torch.Tensor,
    temb: torch.Tensor,
    rope: RowRope,
    kv: LayerKV,
    text_kv: tuple[torch.Tensor, torch.Tensor],
    update: RowUpdate,
    shard: RowShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A VACE block on rows: returns (hint rows, control rows), as `WanVACETransformerBlock.forward` does."""
    if block.proj_in is not None:
        control_rows = block.proj_in(control_rows) + hidden_rows
    control_rows = block_rows(block, control_rows, temb, rope, kv, text_kv, update, shard=shard)
    return block.proj_out(control_rows), control_rows
