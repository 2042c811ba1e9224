"""HetCache under Ulysses context parallelism: which rows each rank computes, its attention against the
head-sharded K/V cache, the way back to token chunks, and what every rank must share (docs/PARALLEL.md).

The stock plan (`parallel.VACE_CP_PLAN`) gives rank r the fixed token chunk r. A PARTIAL step computes only the
rows S, which cluster in the mask, so a fixed chunk would leave some ranks idle; the engine splits S instead:

- rows: S (sorted; every token on FULL) padded to a multiple of P by repeating its last index; rank r computes
  the r-th contiguous slice, ceil(|S| / P) rows whatever the mask. On FULL that is exactly the stock chunk r.
- self-attention: diffusers' Ulysses all-to-alls move the rank's Q, K, V to head shards [B, |S padded|, H / P, D];
  the K/V cache holds every token for the rank's heads [B, N, H / P, D]; the fresh rows of S are written there,
  the queries attend to all N cached keys, and the output comes back through the reverse all-to-all. The padded
  rows are attended for but never written.
- exit (before `norm_out`): each computed row goes to the rank whose token chunk holds it (one all-to-all with
  uneven splits, known everywhere from S); the rank assembles its chunk (computed rows, h_in + R elsewhere) and
  refreshes its chunk of R. The head runs on the chunk and diffusers' `proj_out` gather completes the output.
- REUSE: h_in + R of the rank's chunk, the head and the output gather (the only communication of the step).
- what every rank must share: the plan and each step's S (an all-gather of a digest per computed step, a clear
  error when they differ), the interaction scores (each rank has some heads: their per-head sums are gathered),
  and the context choice (rank 0 gathers the hidden states, chooses, and broadcasts the rows).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hetcache import compat
from hetcache.core import call_argument, parameter_names, replace_arguments
from hetcache.errors import UserError
from hetcache.sparse import attention

if TYPE_CHECKING:
    from hetcache.engine import StepContext
    from hetcache.parallel import UlyssesGroup
    from hetcache.session import VideoSession
    from hetcache.store import BranchCache, CacheStore, LayerKV, RowUpdate

STEP_NAMES = {"F": "FULL", "P": "PARTIAL", "R": "REUSE"}


def token_chunk(group: UlyssesGroup, num_tokens: int) -> slice:
    """The tokens whose residual and output rows this rank holds: diffusers' `EquipartitionSharder` chunk (so its
    gather puts them back in order)."""
    size = num_tokens // group.degree
    return slice(group.rank * size, (group.rank + 1) * size)


class RowShard:
    """This rank's share of one step: the rows it computes, their attention, and their way to the token chunks."""

    def __init__(self, group: UlyssesGroup, rows: torch.Tensor | None, num_tokens: int,
                 device: torch.device) -> None:
        self.group = group
        self.chunk = token_chunk(group, num_tokens)
        degree, rank = group.degree, group.rank
        if rows is None:  # FULL: the stock chunks; every computed row is already where it belongs
            self.count = num_tokens
            self.local = torch.arange(self.chunk.start, self.chunk.stop, device=device)
            return
        self.count = count = rows.numel()
        per_rank = -(-count // degree)
        padded = torch.cat([rows, rows[-1:].expand(per_rank * degree - count)]) if count else rows
        self.local = padded[rank * per_rank:(rank + 1) * per_rank]
        # starts[k]: where chunk k's rows begin in S. Rank q computed S[q m, q m + m); chunk k holds
        # S[starts[k], starts[k + 1]); the rows q sends to k are the overlap, in order.
        bounds = torch.arange(0, num_tokens + 1, num_tokens // degree, device=rows.device)
        starts = torch.searchsorted(rows, bounds).tolist()

        def overlap(source: int, chunk: int) -> int:
            low, high = source * per_rank, min((source + 1) * per_rank, count)
            return max(0, min(high, starts[chunk + 1]) - max(low, starts[chunk]))

        self.sent_splits = [overlap(rank, k) for k in range(degree)]
        self.received_splits = [overlap(q, rank) for q in range(degree)]
        self.in_chunk = slice(starts[rank], starts[rank + 1])  # the rows of S in this rank's chunk
        self.positions = rows[self.in_chunk] - self.chunk.start  # ... as positions in the chunk

    def attend(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kv: LayerKV, update: RowUpdate,
               probe: Callable[[torch.Tensor, torch.Tensor], None] | None) -> torch.Tensor:
        """Self-attention of this rank's rows ([B, n, H, D] each) against the K/V of every token, through
        diffusers' Ulysses all-to-alls; `kv` is this rank's head shard of the layer's cache."""
        count = self.count

        def head_shard_attention(ctx: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object,
                                 **kwargs: object) -> torch.Tensor:
            fresh_key, fresh_value = k[:, :count], v[:, :count]  # the padded rows are not written
            keys, values = kv.exchange(fresh_key, fresh_value, update)
            if probe is not None:
                probe(q[:, :count], keys)
            out = attention(attn, q, keys, values)
            kv.settle(fresh_key, fresh_value, update)
            return out

        ledger = self.group.ledger
        for tensor in (query, key, value):
            ledger.all_to_all(tensor)
        out = compat.ulysses_attention(query, key, value, head_shard_attention, self.group.parallel_config)
        ledger.all_to_all(out)
        return out

    def to_chunk(self, rows: torch.Tensor) -> torch.Tensor:
        """The computed rows [1, n, dim] of this rank, exchanged for the computed rows of its token chunk
        [1, |S in chunk|, dim] (ordered as `positions`)."""
        sent = rows[0, :sum(self.sent_splits)].contiguous()
        received = sent.new_empty((sum(self.received_splits), sent.shape[-1]))
        dist.all_to_all_single(received, sent, self.received_splits, self.sent_splits, group=self.group.group)
        kept = self.sent_splits[self.group.rank] * sent.shape[-1]
        self.group.ledger.uneven_all_to_all(sent, received.numel(), kept)
        return received.unsqueeze(0)


class ShardedCalls:
    """What the HetCache engine does differently on a context-parallel transformer, call by call: count the call's
    communication, give computing steps their `RowShard` and check them on every rank, hand a stock block forward
    its chunk, and assemble this rank's token chunk before the head."""

    def __init__(self, group: UlyssesGroup) -> None:
        self.group = group
        self._last: tuple[int, torch.Tensor | None, RowShard] | None = None  # the step both CFG branches share

    def begin(self, session: VideoSession, index: int, kind: str, rows: torch.Tensor | None, first_branch: bool,
              device: torch.device) -> RowShard | None:
        """Open the call; its RowShard (None on REUSE, which communicates only its output gather). The first
        branch of each computed step checks that every rank runs the same plan, step and rows."""
        self.group.ledger.open_call(kind)
        if kind == "R":
            return None
        last = self._last
        if last is None or last[0] != index or last[1] is not rows:
            self._last = last = (index, rows, RowShard(self.group, rows, session.partition.num_tokens, device))
        if first_branch:
            check_step(self.group, session.plan, index, kind, rows, device)
        return last[2]

    def end(self, caches: list[BranchCache]) -> None:
        """Close the call, recording the peak bytes of this rank's `caches` (all branches)."""
        ledger = self.group.ledger
        total = sum(cache.nbytes() for cache in caches)
        if caches and total >= ledger.cache_bytes:
            ledger.cache_bytes, ledger.text_kv_bytes = total, sum(cache.text_nbytes() for cache in caches)
        ledger.close_call()

    def gather_heads(self, mass: torch.Tensor) -> torch.Tensor:
        """This rank's per-head attention mass [H / P, N] completed with the other ranks' ([H, N], heads in order:
        rank r holds heads r H / P to (r + 1) H / P)."""
        parts = [torch.empty_like(mass) for _ in range(self.group.degree)]
        dist.all_gather(parts, mass.contiguous(), group=self.group.group)
        self.group.ledger.all_gather(mass)
        return torch.cat(parts)

    @staticmethod
    def stock_arguments(shard: RowShard, forward: Callable, layer: int, args: tuple,
                        kwargs: dict) -> tuple[tuple, dict]:
        """A block's stock forward (a FULL step of a plan without PARTIAL steps, where the rank's rows are its
        chunk): the chunk of the RoPE tables, and in the first block of the inputs. Its processors run diffusers'
        Ulysses attention."""
        chunk = shard.chunk
        values = {"rotary_emb": tuple(t[:, chunk] for t in call_argument(forward, args, kwargs, "rotary_emb"))}
        if layer == 0:
            for name in ("hidden_states", "control_hidden_states"):
                if name in parameter_names(forward):
                    values[name] = call_argument(forward, args, kwargs, name)[:, chunk]
        return replace_arguments(forward, args, kwargs, values)

    def reuse_residual(self, ctx: StepContext, store: CacheStore, num_tokens: int) -> tuple[torch.Tensor, slice]:
        """A REUSE call's R of this rank's token chunk, and the chunk."""
        chunk = token_chunk(self.group, num_tokens)
        weights = None if ctx.update.weights is None else ctx.update.weights[:, chunk]
        return store.residual(ctx.branch.cache, weights), chunk

    def assemble(self, ctx: StepContext, store: CacheStore, session: VideoSession,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        """norm_out's input for this rank's token chunk: its rows computed by any rank, h_in + R elsewhere; the
        chunk of R is refreshed. FULL steps of the first branch also choose the context rows (on rank 0)."""
        shard, branch = ctx.shard, ctx.branch
        hidden_in = branch.hidden_in[:, shard.chunk].float()
        if ctx.kind == "F":  # the rank computed its chunk
            store.keep_residual(branch.cache, hidden_states - hidden_in, branch.hidden_in.dtype, ctx.time,
                                ctx.update.in_place, num_tokens=session.partition.num_tokens)
            if ctx.select_now:
                share_context_choice(self.group, session, ctx.index, hidden_states, ctx.scores)
            return hidden_states
        computed = shard.to_chunk(hidden_states)
        weights = None if ctx.update.weights is None else ctx.update.weights[:, shard.chunk]
        full = hidden_in + store.residual(branch.cache, weights).float()
        full.index_copy_(1, shard.positions, computed)
        fresh = computed - hidden_in.index_select(1, shard.positions)
        blend = None if ctx.update.blend is None else ctx.update.blend[shard.in_chunk]
        store.update_residual_rows(branch.cache, shard.positions, fresh, blend, ctx.time, computed=ctx.rows)
        return full


def check_step(group: UlyssesGroup, plan: str, index: int, kind: str, rows: torch.Tensor | None,
               device: torch.device) -> None:
    """Stop every rank with a message unless all have the same plan, step, step kind and rows (one all-gather of a
    six-number digest)."""
    header = torch.tensor([zlib.crc32(plan.encode()), index, "FPR".index(kind)], dtype=torch.int64, device=device)
    if rows is None:
        tail = torch.tensor([-1, 0, 0], dtype=torch.int64, device=device)
    else:
        rows = rows.to(torch.int64)
        order = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device)
        tail = torch.stack([torch.tensor(rows.numel(), device=rows.device), rows.sum(), (rows * order).sum()])
    digest = torch.cat([header, tail.to(device)])
    parts = [torch.empty_like(digest) for _ in range(group.degree)]
    dist.all_gather(parts, digest, group=group.group)
    group.ledger.all_gather(digest)
    table = torch.stack(parts).cpu()
    differ = [rank for rank in range(group.degree) if not torch.equal(table[rank], table[0])]
    if differ:
        raise UserError(
            f"the context-parallel processes disagree at step {index}: rank 0 has {_describe(table[0])}, rank "
            f"{differ[0]} has {_describe(table[differ[0]])}; every process must run the same video, mask, seed "
            "and HetCache configuration"
        )


def _describe(digest: torch.Tensor) -> str:
    plan, index, kind, count = (int(v) for v in digest[:4])
    rows = "all rows" if count < 0 else f"{count} rows (digest {int(digest[5]):x})"
    return f"plan {plan:08x}, step {index} {STEP_NAMES['FPR'[kind]]} of {rows}"


def share_context_choice(group: UlyssesGroup, session: VideoSession, index: int, hidden_chunk: torch.Tensor,
                         scores: torch.Tensor | None) -> None:
    """The context choice of FULL step `index`, made once on rank 0 and adopted by every rank: rank 0 gathers
    every token's last-block hidden state (the ranks hold chunks of them) when the choice clusters them."""
    root = group.rank == 0
    features = None
    if session.needs_features:
        chunk = hidden_chunk.contiguous()
        parts = [torch.empty_like(chunk) for _ in range(group.degree)] if root else None
        dist.gather(chunk, parts, dst=group.global_rank(0), group=group.group)
        group.ledger.gather(chunk, root)
        features = torch.cat(parts, dim=1) if root else None
    if root:
        choice = session.choose_context(index, features, scores)
    else:
        choice = torch.empty(session.context_size, dtype=torch.int64, device=hidden_chunk.device)
    if choice.numel():
        dist.broadcast(choice, src=group.global_rank(0), group=group.group)
        group.ledger.broadcast(choice, root)
    session.adopt_context(index, choice)
