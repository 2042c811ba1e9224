"""The HetCache engine: decides what each transformer call computes and runs the blocks on those rows.

diffusers' own forward stays in charge of the data flow (embeddings, VACE hints, the main loop, the head); the hooks
of `hetcache.hooks` call in here and change how many token rows flow through it:

- FULL and PARTIAL: the first VACE block and the first main block gather the rows S of this step from the full
  token sequence (all tokens on FULL, the selected rows on PARTIAL), so every block, every hint addition and every
  VACE block works on |S| rows only; each block runs on its rows with the layer's K/V buffer (`sparse.py`), so
  queries still see all N keys; before the head (`norm_out`'s input) the sequence is put back together: computed
  rows as they are, the others as h_in + R, where R = h_out - h_in is the per-token residual of the whole block
  stack from the last step that computed the token.
- REUSE: the forward is not run at all; `hooks.reuse_forward` computes head(h_in + R).

A FULL step of a plan without PARTIAL steps runs the stock block forward (bitwise the stock output). Per-branch
buffers live in the cache store (`store.py`), per-video state in a session (`session.py`). On a transformer with
context parallelism (`hetcache.parallel`) each rank computes its share of the rows (`hetcache.shard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import BaseState

from hetcache import flops, graphs, memory, parallel, plan
from hetcache.config import HetCacheConfig
from hetcache.core import CacheStats, StepClock
from hetcache.errors import UserError
from hetcache.pipeline import preview_timesteps
from hetcache.session import EditMask, VideoSession, start_session
from hetcache.shard import RowShard, ShardedCalls
from hetcache.sparse import RowRope, block_rows, vace_block_rows
from hetcache.store import BranchCache, CacheStore, RowUpdate


class BranchState(BaseState):
    """One CFG branch: its cache buffers, how many calls it made, the token grid and block-stack input of its call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.cache = BranchCache()
        self.calls = 0
        self.grid: tuple[int, int, int] | None = None
        self.hidden_in: torch.Tensor | None = None


@dataclass
class StepContext:
    """What one transformer call does; read by the block hooks."""

    index: int
    kind: str
    time: torch.Tensor  # the call's timestep value, [1] (forecasts extrapolate to it)
    rows: torch.Tensor | None  # None on FULL (all rows)
    branch: BranchState
    update: RowUpdate
    select_now: bool  # this call computes the context selection (FULL, first branch of the step)
    stock: bool  # a FULL step of a plan without PARTIAL steps: blocks run their stock forward, no K/V kept
    rope: RowRope | None = None
    scores: torch.Tensor | None = None
    shard: RowShard | None = None  # this rank's share of the rows, under context parallelism


class HetCacheEngine:
    """Step kinds per call, and the row-subset execution of the blocks for FULL and PARTIAL calls."""

    def __init__(self, transformer: torch.nn.Module, config: HetCacheConfig, *, scheduler: Any = None,
                 timesteps: torch.Tensor | None = None, num_inference_steps: int | None = None,
                 experts: plan.Experts | None = None) -> None:
        self.transformer, self.config = transformer, config
        self.experts = experts  # a two-expert pipeline's transformers: one plan for both, each starting FULL
        self.siblings: list[HetCacheEngine] = []  # the other expert's engine
        self.clock = StepClock(scheduler if scheduler is not None else timesteps)
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps
        self.shape = flops.ModelShape.from_config(transformer.config)
        self.num_main = len(transformer.blocks)
        self.mask = EditMask()
        group = parallel.ulysses_group(transformer)
        self.sharded = ShardedCalls(group) if group is not None else None  # None without context parallelism
        if group is not None and config.compile:
            raise UserError("compile=True is not supported under context parallelism yet: run without --compile")
        self.store = CacheStore(config.cache_dtype, self.shape.heads, config.reuse,
                                head_shards=group.degree if group is not None else 1)
        self.requested_steps: int | None = None  # S of a pipeline call that runs S' solver steps
        self.text_len_hint = 512  # the text length a pipeline call's embeddings will have (before they exist)
        self.main_rows, self.vace_rows = block_rows, vace_block_rows
        if config.compile:
            self.main_rows = torch.compile(block_rows, dynamic=True)
            self.vace_rows = torch.compile(vace_block_rows, dynamic=True)
        self.branches: dict[str, BranchState] = {}  # the root hook's per-context states, by cache_context name
        # CUDA graphs would capture the collectives of context parallelism: not tried, so off there
        self.graphs = graphs.PartialGraphs() if config.cuda_graphs and group is None else None
        self.session: VideoSession | None = None
        self.last_stats = CacheStats()
        self.ctx: StepContext | None = None
        self.graphs_active = False  # this video's PARTIAL steps replay CUDA graphs (and FULL steps write in place)

    @property
    def stats(self) -> CacheStats:
        return self.session.stats if self.session is not None else self.last_stats

    # ----------------------------------------------------------------------------------------------- video
    def end_video(self) -> None:
        """The pipeline reset its stateful hooks after a call: drop per-video state, keep the stats."""
        self.mask.call = self.mask.early = None
        self.requested_steps = None
        self._drop_session()

    def begin_pipeline_call(self, pixel_mask: torch.Tensor, num_reference_frames: int) -> None:
        """A pipeline call is starting: its pixel mask [F, H, W] (True = generate) and reference images define
        this video's partition."""
        self.mask.call = (pixel_mask, num_reference_frames)
        self._drop_session()

    def set_mask(self, mask: torch.Tensor | None, *, token_coverage: bool = False) -> None:
        """Mask for direct transformer calls: a pixel mask [F, H, W] (True/ > 0.5 = generate) or, with
        `token_coverage=True`, a per-token coverage [T, H', W'] in [0, 1]."""
        self.mask.user = None if mask is None else (mask, token_coverage)
        self._drop_session()

    def drop_caches(self) -> None:
        """Free every branch's buffers (keeping the stats): this expert runs no further step of the video."""
        for state in self.branches.values():
            state.reset()
        if self.graphs is not None:
            self.graphs.clear()

    def _drop_session(self) -> None:
        if self.session is not None:
            self.last_stats = self.session.stats
        self.session, self.ctx, self.graphs_active = None, None, False
        if self.graphs is not None:
            self.graphs.clear()

    def _use_graphs(self, device: torch.device) -> bool:
        """CUDA graphs for this video: asked for and never failed, PARTIAL steps small enough to be host-bound, on
        a device where capture works (`graphs.capturable`)."""
        session = self.session
        if self.graphs is None or self.graphs.failure is not None or not session.has_partial_steps:
            return False
        if self.store.host is not None:
            session.stats.note("CUDA graphs off: the host tier's copies run on their own streams beside the compute")
            return False
        rows = plan.partial_row_count(session.partition, self.config)
        return graphs.capturable(self.transformer, device) and rows <= graphs.MAX_ROW_SHARE * session.partition.num_tokens

    # ------------------------------------------------------------------------------------------------ call
    def begin_call(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                   branch: BranchState, branch_name: str) -> StepContext:
        """Decide what this call computes (its StepContext), starting the video's session at its first call."""
        if hidden_states.shape[0] != 1:
            raise ValueError(f"hetcache runs one video at a time (batch size 1), got batch size {hidden_states.shape[0]}")
        p_t, p_h, p_w = self.transformer.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        session = self.session
        period = len(session.plan) if session else len(self.config.plan or "") or self.num_inference_steps
        index = self.clock.index(timestep, branch.calls, period)
        if session is None or (index == 0 and branch_name == session.first_branch and session.stats.plan):
            self._drop_session()
            timesteps = self.clock.timesteps()
            session = self.session = start_session(self.transformer, self.config, self.mask, grid,
                                                   hidden_states.device, text.shape[1], timesteps,
                                                   self.num_inference_steps, branch_name, self.requested_steps,
                                                   self.experts)
            for sibling in self.siblings:  # the other expert has run its steps of this video (or of the last one)
                sibling.drop_caches()
            tier, note = memory.place_cache(self.transformer, self.config, session.partition.num_tokens,
                                            text.shape[1], hidden_states.device, shards=self.store.head_shards)
            self.store.use_host(tier)
            if note:
                session.stats.note(note)
            self.graphs_active = self._use_graphs(hidden_states.device)
        if session.partition.grid != grid:
            raise ValueError(f"the token grid changed mid-video ({session.partition.grid} -> {grid}); call hetcache.reset")

        kind = session.kind(index)
        if not branch.cache.ready or branch.grid != grid:
            kind = "F"  # nothing cached for this branch yet
        branch.cache.name = branch_name
        if self.store.use_text(branch.cache, text) and self.graphs is not None:
            self.graphs.clear()  # the graphs read the old text K/V
        branch.grid = grid
        rows, blend = None, None
        if kind == "P":
            rows = session.partial_rows(index)
            blend = session.blend(rows) if self.config.ema_alpha > 0 else None
        elif kind == "R":
            rows = torch.empty(0, dtype=torch.long, device=hidden_states.device)
        time = timestep.flatten()[:1]
        weights = None if kind == "F" else self.store.forecast_weights(branch.cache, time)
        update = RowUpdate(rows, blend, self.config.cache_dtype, in_place=self.graphs_active, weights=weights)
        select_now = kind == "F" and session.has_partial_steps and session.selection_step != index
        stock = kind == "F" and not session.has_partial_steps
        self.ctx = StepContext(index, kind, time, rows, branch, update, select_now, stock)
        if self.sharded is not None:
            self.ctx.shard = self.sharded.begin(session, index, kind, rows, branch_name == session.first_branch,
                                                hidden_states.device)
        computed = session.partition.num_tokens if rows is None else int(rows.numel())
        session.account(branch_name, kind, computed, text_kv=stock or not branch.cache.text_kv)
        branch.calls += 1
        return self.ctx

    def use_rows(self, rows: torch.Tensor, timestep: torch.Tensor | None = None) -> None:
        """Read this call's rows from `rows` and its timestep from `timestep` (a CUDA graph's own buffers). Called
        inside the capture, so the EMA and forecast weights computed here and the gather, RoPE rows and assembly
        computed later all derive from the buffers on every replay."""
        ctx = self.ctx
        ctx.rows = ctx.update.index = rows
        if ctx.update.blend is not None:
            ctx.update.blend = self.session.blend(rows)
        if timestep is not None:
            ctx.time = timestep.flatten()[:1]
            if ctx.update.weights is not None:
                ctx.update.weights = self.store.forecast_weights(ctx.branch.cache, ctx.time)
        ctx.rope = None
        self.session.rope_rows = {}

    def solver_steps(self, requested: int) -> int:
        """S' for a pipeline call that asks for `requested` steps (`plan.solver_steps`); remembered, since a budget
        and the FLOPs share are relative to the requested count."""
        self.requested_steps = requested
        scheduler = self.clock.source

        def timesteps_for(steps: int) -> torch.Tensor:
            return preview_timesteps(scheduler, steps)

        partition = self.mask.early_partition(self.config, tuple(self.transformer.config.patch_size))
        return plan.solver_steps(self.transformer, self.config, requested, partition=partition,
                                 text_len=self.text_len_hint, timesteps_for=timesteps_for, experts=self.experts)

    def end_call(self) -> None:
        if self.graphs is not None and self.graphs.failure is not None:
            self.stats.note(f"CUDA graphs off, PARTIAL steps run eagerly: a capture failed with {self.graphs.failure}")
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            total = sum(state.cache.nbytes() for state in self.branches.values())
            self.stats.cache_bytes = max(self.stats.cache_bytes, total)
        if self.sharded is not None:
            self.sharded.end([state.cache for state in self.branches.values()] if ctx is not None else [])

    # ---------------------------------------------------------------------------------------------- blocks
    def _rope(self, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> RowRope:
        ctx = self.ctx
        if ctx.rope is None:
            rows = ctx.rows if ctx.shard is None else ctx.shard.local
            ctx.rope = self.session.rope(rotary_emb, rows, ctx.index)
        return ctx.rope

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.ctx.rows if self.ctx.shard is None else self.ctx.shard.local
        return x if rows is None else x.index_select(1, rows)

    def stock_arguments(self, forward: Any, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments of a block's stock forward (`forward`: its unbound forward): the call's own, or under
        context parallelism those of this rank's token chunk (`ShardedCalls.stock_arguments`)."""
        shard = self.ctx.shard if self.ctx is not None else None
        return (args, kwargs) if shard is None else self.sharded.stock_arguments(shard, forward, layer, args, kwargs)

    def _buffers(self, kind: str, layer: int, block: torch.nn.Module, hidden: torch.Tensor, text: torch.Tensor) -> tuple:
        ctx = self.ctx
        kv = self.store.layer_kv(ctx.branch.cache, kind, layer, hidden, self.session.partition.num_tokens,
                                 ctx.update.in_place, computes_all=ctx.rows is None)
        return kv, self.store.text_kv(ctx.branch.cache, kind, layer, block.attn2, text)

    def main_block(self, block: torch.nn.Module, layer: int, hidden_states: torch.Tensor, text: torch.Tensor,
                   temb: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The block's rows for this step, or None when the block should run its stock forward."""
        ctx = self.ctx
        if layer == 0:
            ctx.branch.hidden_in = hidden_states
            hidden_states = self._gather(hidden_states)
        if ctx.stock:
            return None
        kv, text_kv = self._buffers("main", layer, block, hidden_states, text)
        args = (block, hidden_states, temb, self._rope(rotary_emb), kv, text_kv, ctx.update)
        if ctx.select_now and layer == self.num_main - 1 and self.session.needs_scores:
            # eager: the probe stays out of compiled graphs
            out = block_rows(*args, probe=self._score_probe, shard=ctx.shard)
        else:
            out = self.main_rows(*args, shard=ctx.shard)
        self.store.release(ctx.branch.cache, "main", layer, kv)
        return out

    def vace_block(self, block: torch.nn.Module, layer: int, hidden_states: torch.Tensor, text: torch.Tensor,
                   control: torch.Tensor, temb: torch.Tensor,
                   rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(hint rows, control rows) for this step, or None when the block should run its stock forward."""
        ctx = self.ctx
        if ctx.stock:
            return None
        if layer == 0:
            control = self._gather(control)
            hidden_states = self._gather(hidden_states)
        kv, text_kv = self._buffers("vace", layer, block, hidden_states, text)
        out = self.vace_rows(block, hidden_states, control, temb, self._rope(rotary_emb), kv, text_kv, ctx.update,
                             shard=ctx.shard)
        self.store.release(ctx.branch.cache, "vace", layer, kv)
        return out

    def _score_probe(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        gather = self.sharded.gather_heads if self.sharded is not None else None
        self.ctx.scores = self.session.interaction_scores(query, keys, gather)

    def reuse_inputs(self) -> tuple[torch.Tensor, slice | None]:
        """What a REUSE call adds to h_in: R of every token, or under context parallelism R of this rank's token
        chunk, and that chunk."""
        ctx = self.ctx
        if self.sharded is None:
            return self.store.residual(ctx.branch.cache, ctx.update.weights), None
        return self.sharded.reuse_residual(ctx, self.store, self.session.partition.num_tokens)

    def assemble(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """norm_out's input: computed rows plus h_in + R elsewhere; refreshes R for the computed rows."""
        ctx = self.ctx
        if ctx is None or ctx.kind == "R":  # outside a transformer call, or `reuse_forward` assembled it already
            return hidden_states
        if ctx.shard is not None:
            return self.sharded.assemble(ctx, self.store, self.session, hidden_states)
        branch = ctx.branch
        hidden_in = branch.hidden_in.float()
        if ctx.kind == "F":
            self.store.keep_residual(branch.cache, hidden_states - hidden_in, branch.hidden_in.dtype, ctx.time,
                                     ctx.update.in_place)
            if ctx.select_now:
                self.session.select_context(ctx.index, hidden_states, ctx.scores)
            return hidden_states
        full = hidden_in + self.store.residual(branch.cache, ctx.update.weights).float()
        full.index_copy_(1, ctx.rows, hidden_states)
        fresh = hidden_states - hidden_in.index_select(1, ctx.rows)
        self.store.update_residual_rows(branch.cache, ctx.rows, fresh, ctx.update.blend, ctx.time)
        return full
