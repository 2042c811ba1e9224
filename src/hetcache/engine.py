"""The HetCache engine: FULL / PARTIAL / REUSE execution of a WanVACETransformer3DModel through diffusers hooks.

diffusers' own forward stays in charge of the data flow (embeddings, VACE hints, the main loop, the head); hooks
change how many token rows flow through it:

- the first VACE block and the first main block gather the rows S of this step from the full token sequence
  (S = all tokens on FULL, the selected rows on PARTIAL, none on REUSE), so every block, every hint addition
  and every VACE block works on |S| rows only;
- each block runs on its rows with the layer's K/V buffer (`sparse.py`), so queries still see all N keys;
- a pre-hook on `norm_out` puts the sequence back together before the head: computed rows as they are, the
  others as h_in + R, where R = h_out - h_in is the per-token residual of the whole block stack from the last
  step that computed the token.

A REUSE step is a PARTIAL step with S empty: no block does any work. Per-branch caches (K/V buffers, text K/V,
residual) live in a diffusers `StateManager` keyed by `cache_context` ("cond" / "uncond"); the plan, the token
partition and the selected rows are shared by both branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from hetcache import flops, plan, select, tokens
from hetcache.config import HetCacheConfig
from hetcache.graphs import MAX_ROW_SHARE, PartialGraphs
from hetcache.sparse import LayerKV, RowRope, RowUpdate, blend_rows, block_rows, text_key_value, vace_block_rows

HOOK_NAME = "hetcache"
DEFAULT_CONTEXT = "default"
# Selection at FULL steps: interaction scores from at most this many generative queries, k-means centres fitted on
# at most this many context tokens. Both keep the selection near 1 % of a FULL CFG step at 480p (docs/BENCHMARKS.md).
SCORE_QUERIES = 1024
KMEANS_POINTS = 2048


@dataclass
class HetCacheStats:
    """What the last (or current) video's denoising did, with analytic FLOPs of both CFG branches."""

    plan: str = ""  # executed step kinds, one letter per step (first branch)
    planned: str = ""  # the plan as resolved before the first step
    delta: float | None = None
    flops: float = 0.0
    dense_flops: float = 0.0
    tokens: dict[str, int] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # computed rows per step (first branch)
    cache_bytes: int = 0  # peak bytes held by caches, all branches
    branches: dict[str, str] = field(default_factory=dict)  # executed letters per branch
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "planned": self.planned,
            "delta": self.delta,
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "flops_ratio": self.flops_ratio,
            "tokens": dict(self.tokens),
            "rows": list(self.rows),
            "cache_bytes": self.cache_bytes,
            "branches": dict(self.branches),
            "notes": list(self.notes),
        }


class BranchState(BaseState):
    """Caches of one CFG branch: K/V buffers per layer, text K/V per layer, the block-stack residual."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.main_kv: dict[int, LayerKV] = {}
        self.vace_kv: dict[int, LayerKV] = {}
        self.text_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_source: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.hidden_in: torch.Tensor | None = None
        self.grid: tuple[int, int, int] | None = None
        self.calls = 0
        self.letters = ""

    def nbytes(self) -> int:
        total = sum(kv.nbytes() for kv in (*self.main_kv.values(), *self.vace_kv.values()))
        total += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.text_kv.values())
        if self.residual is not None:
            total += self.residual.numel() * self.residual.element_size()
        return total


@dataclass
class StepContext:
    """What one transformer call does; read by the block hooks."""

    index: int
    kind: str
    rows: torch.Tensor | None  # None on FULL (all rows)
    branch: BranchState
    update: RowUpdate
    select_now: bool  # this call computes the context selection (FULL, first branch of the step)
    stock: bool  # a FULL step of a plan without PARTIAL steps: blocks run their stock forward, no K/V kept
    rope: RowRope | None = None
    scores: torch.Tensor | None = None


def _call_arg(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


class HetCacheEngine:
    """Shared per-video state (partition, plan, selection, stats) and the per-call execution logic."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        config: HetCacheConfig,
        *,
        scheduler: Any = None,
        timesteps: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
    ) -> None:
        self.transformer = transformer
        self.config = config
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.num_inference_steps = num_inference_steps
        self.shape = flops.ModelShape.from_config(transformer.config)
        self.num_main = len(transformer.blocks)
        self.user_mask: tuple[torch.Tensor, bool] | None = None  # (mask, is_token_coverage)
        self.call_mask: tuple[torch.Tensor, int] | None = None  # (pixel mask, reference frames) of a pipeline call
        self.stats = HetCacheStats()
        self.main_rows, self.vace_rows = block_rows, vace_block_rows
        if config.compile:
            self.main_rows = torch.compile(block_rows, dynamic=True)
            self.vace_rows = torch.compile(vace_block_rows, dynamic=True)
        self._states: dict[str, BranchState] = {}
        self._first_branch_name = ""
        self._timesteps_host: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.graphs = PartialGraphs() if config.cuda_graphs else None
        self._new_video()

    # ----------------------------------------------------------------------------------------------- video state
    def _new_video(self) -> None:
        self.partition: tokens.TokenPartition | None = None
        self.plan: str | None = None
        self.context_choice: torch.Tensor | None = None
        self.selection_step = -1
        self.step_rows: dict[int, torch.Tensor] = {}
        self.rope_full: RowRope | None = None
        self.rope_rows: dict[int, RowRope] = {}
        self.gen_flags: torch.Tensor | None = None
        self.text_len = 0
        self.ctx: StepContext | None = None
        self._video_started = False
        self.graphs_active = False  # this video's PARTIAL steps replay CUDA graphs (and FULL steps write in place)
        if self.graphs is not None:
            self.graphs.clear()

    def end_video(self) -> None:
        """Called when the pipeline resets its stateful hooks after a call: drop per-video state, keep stats."""
        self.call_mask = None
        self._new_video()

    def begin_pipeline_call(self, pixel_mask: torch.Tensor, num_reference_frames: int) -> None:
        """A pipeline call is starting: its pixel mask [F, H, W] (True = generate) and reference images define
        this video's partition."""
        self.call_mask = (pixel_mask, num_reference_frames)
        self._new_video()

    def set_mask(self, mask: torch.Tensor | None, *, token_coverage: bool = False) -> None:
        """Mask for direct transformer calls: a pixel mask [F, H, W] (True/ > 0.5 = generate) or, with
        `token_coverage=True`, a per-token coverage [T, H', W'] in [0, 1]."""
        self.user_mask = None if mask is None else (mask, token_coverage)
        self._new_video()

    def _partition_for(self, grid: tuple[int, int, int], device: torch.device) -> tokens.TokenPartition:
        cfg = self.config
        options = dict(margin=cfg.margin, gen_threshold=cfg.gen_threshold, temporal_margin=cfg.temporal_margin)
        if self.call_mask is not None:
            pixel_mask, references = self.call_mask
            return tokens.partition_from_pixel_mask(
                pixel_mask.to(device), grid, num_reference_frames=references, **options
            )
        if self.user_mask is None:
            partial_possible = "P" in self.config.plan if self.config.plan else self.config.kappa > 1.0
            if not partial_possible:  # a timestep-level plan (TeaCache): no token is treated apart
                return tokens.partition_tokens(torch.ones(grid, device=device), margin=0)
            raise ValueError(
                "hetcache needs the edit mask: call the pipeline with mask=..., or pass mask= to hetcache.enable "
                "(or hetcache.set_mask) when calling the transformer directly"
            )
        mask, is_coverage = self.user_mask
        if not is_coverage:
            return tokens.partition_from_pixel_mask(mask.to(device), grid, **options)
        coverage = mask.to(device=device, dtype=torch.float32)
        refs = grid[0] - coverage.shape[0]
        if refs < 0 or tuple(coverage.shape[1:]) != grid[1:]:
            raise ValueError(f"token mask of shape {tuple(coverage.shape)} does not fit the token grid {grid}")
        return tokens.partition_tokens(coverage, num_reference_frames=refs, **options)

    def _timesteps(self) -> torch.Tensor | None:
        if self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            return self.scheduler.timesteps
        return self.timesteps

    def _start_video(self, grid: tuple[int, int, int], device: torch.device, text_len: int) -> None:
        self.partition = self._partition_for(grid, device)
        self.text_len = text_len
        timesteps = self._timesteps()
        num_steps = self.num_inference_steps
        if timesteps is not None:
            num_steps = len(timesteps)
        elif self.config.plan is not None:
            num_steps = len(self.config.plan)
        self.plan, delta, notes = resolve_plan(
            self.transformer, self.config, self.partition, text_len, timesteps=timesteps, num_steps=num_steps
        )
        labels = self.partition.labels()
        self.gen_flags = labels == 0
        counts = self.partition.counts()
        self.stats = HetCacheStats(planned=self.plan, delta=delta, tokens=counts, notes=notes)
        self.graphs_active = self._use_graphs(device)
        self._video_started = True

    def _use_graphs(self, device: torch.device) -> bool:
        """CUDA graphs for this video: asked for and never failed, PARTIAL steps small enough to be host-bound, on
        the current CUDA device (capture records that device's streams only), no offloading hooks (they move
        weights during the forward)."""
        if self.graphs is None or self.graphs.failure is not None or "P" not in self.plan:
            return False
        if device.type != "cuda" or (device.index is not None and device.index != torch.cuda.current_device()):
            return False
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)  # diffusers' group offloading hooks
            if hasattr(module, "_hf_hook") or (registry is not None and any("offload" in n for n in registry.hooks)):
                return False
        return partial_row_count(self.partition, self.config) <= MAX_ROW_SHARE * self.partition.num_tokens

    # ------------------------------------------------------------------------------------------------ per call
    def _step_index(self, timestep: torch.Tensor, branch: BranchState) -> int:
        timesteps = self._timesteps()
        if timesteps is not None and timestep is not None:
            if self._timesteps_host[0] is not timesteps:
                self._timesteps_host = (timesteps, timesteps.detach().float().cpu())
            value = float(timestep.flatten()[0])
            distance = (self._timesteps_host[1] - value).abs()
            nearest = int(distance.argmin())
            if float(distance[nearest]) <= 1e-3 * max(1.0, abs(value)):
                return nearest
        if self.plan is None and self.config.plan is None and self.num_inference_steps is None:
            return branch.calls
        total = len(self.plan or self.config.plan or "") or self.num_inference_steps
        return branch.calls % total

    def begin_call(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, branch: BranchState,
                   branch_name: str) -> None:
        if hidden_states.shape[0] != 1:
            raise ValueError(f"hetcache runs one video at a time (batch size 1), got batch size {hidden_states.shape[0]}")
        p_t, p_h, p_w = self.transformer.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        grid = (frames // p_t, height // p_h, width // p_w)
        index = self._step_index(timestep, branch)
        restart = index == 0 and branch_name == self._first_branch_name and bool(self.stats.plan)
        if not self._video_started or restart:
            self._new_video()
            self._first_branch_name = branch_name
            self._start_video(grid, hidden_states.device, text.shape[1])
        if self.partition.grid != grid:
            raise ValueError(f"the token grid changed mid-video ({self.partition.grid} -> {grid}); call hetcache.reset")

        kind = self.plan[index] if index < len(self.plan) else "F"
        if branch.residual is None or branch.grid != grid:
            kind = "F"  # nothing cached for this branch yet
        if branch.text_source is not text:
            branch.text_kv.clear()
            if self.graphs is not None:  # the graphs read the old text K/V
                self.graphs.clear()
            branch.text_source = text
        branch.grid = grid

        rows, blend = None, None
        if kind == "P":
            rows = self._partial_rows(index)
            if self.config.ema_alpha > 0:
                blend = self._blend(rows)
        elif kind == "R":
            rows = torch.empty(0, dtype=torch.long, device=hidden_states.device)
        update = RowUpdate(rows, blend, self.config.cache_dtype, in_place=self.graphs_active)
        first_branch = branch_name == self._first_branch_name
        partial_plan = "P" in self.plan
        select_now = kind == "F" and partial_plan and self.selection_step != index
        self.ctx = StepContext(index, kind, rows, branch, update, select_now, stock=kind == "F" and not partial_plan)
        self._account(kind, rows, first_branch, text_kv=self.ctx.stock or not branch.text_kv)
        branch.calls += 1
        branch.letters += kind
        self.stats.branches[branch_name] = branch.letters

    def _blend(self, rows: torch.Tensor) -> torch.Tensor:
        """EMA weight of the old value per row: 0 for generative rows (always replaced), alpha elsewhere."""
        return torch.where(self.gen_flags[rows], 0.0, self.config.ema_alpha).float()

    def _partial_rows(self, index: int) -> torch.Tensor:
        if index not in self.step_rows:
            phase = self.plan[:index].count("P")
            self.step_rows[index] = select.partial_rows(
                self.partition,
                margin_ratio=self.config.margin_ratio,
                context_ratio=self.config.context_ratio,
                phase=phase,
                context_choice=self.context_choice,
            )
        return self.step_rows[index]

    def _account(self, kind: str, rows: torch.Tensor | None, first_branch: bool, text_kv: bool) -> None:
        n = self.partition.num_tokens
        computed = n if rows is None else int(rows.numel())
        self.stats.flops += flops.forward_flops(self.shape, n, computed, self.text_len, text_kv=text_kv and computed > 0)
        self.stats.dense_flops += flops.forward_flops(self.shape, n, n, self.text_len, text_kv=True)
        if first_branch:
            self.stats.plan += kind
            self.stats.rows.append(computed)

    def use_rows(self, rows: torch.Tensor) -> None:
        """Read this call's rows from `rows` (a CUDA graph's own buffer). Called inside the capture, so the EMA
        weights computed here and the gather, RoPE rows and assembly computed later all derive from the buffer on
        every replay."""
        ctx = self.ctx
        ctx.rows = ctx.update.index = rows
        if ctx.update.blend is not None:
            ctx.update.blend = self._blend(rows)
        ctx.rope = None
        self.rope_rows = {}

    def end_call(self) -> None:
        if self.graphs is not None and self.graphs.failure is not None:
            note = f"CUDA graphs off, PARTIAL steps run eagerly: a capture failed with {self.graphs.failure}"
            if note not in self.stats.notes:
                self.stats.notes.append(note)
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            total = sum(state.nbytes() for state in self._branch_states())
            self.stats.cache_bytes = max(self.stats.cache_bytes, total)

    def _branch_states(self) -> list[BranchState]:
        return list(self._states.values())

    # ------------------------------------------------------------------------------------------- block hooks
    def _rope(self, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> RowRope:
        ctx = self.ctx
        if ctx.rope is None:
            if self.rope_full is None:
                self.rope_full = RowRope.from_rotary_emb(rotary_emb)
            if ctx.rows is None:
                ctx.rope = self.rope_full
            else:
                if ctx.index not in self.rope_rows:
                    self.rope_rows = {ctx.index: self.rope_full.rows(ctx.rows)}
                ctx.rope = self.rope_rows[ctx.index]
        return ctx.rope

    def _text(self, kind: str, layer: int, attn: torch.nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.ctx.branch.text_kv
        if (kind, layer) not in cache:
            cache[(kind, layer)] = text_key_value(attn, text)
        return cache[(kind, layer)]

    def _layer_kv(self, layers: dict[int, LayerKV], layer: int, hidden: torch.Tensor) -> LayerKV:
        """The layer's K/V buffers. In place mode (CUDA graphs) they are allocated here, once, so the block maths
        always writes into existing tensors (and compiled code sees one kind of argument)."""
        kv = layers.setdefault(layer, LayerKV())
        if self.ctx.update.in_place:
            heads = self.shape.heads
            shape = (hidden.shape[0], self.partition.num_tokens, heads, self.shape.dim // heads)
            dtype = self.config.cache_dtype or hidden.dtype
            if kv.key is None or kv.key.shape != shape or kv.key.dtype != dtype:
                kv.key = torch.empty(shape, dtype=dtype, device=hidden.device)
                kv.value = torch.empty_like(kv.key)
        return kv

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.ctx.rows
        return x if rows is None else x.index_select(1, rows)

    def main_block(self, block: torch.nn.Module, layer: int, hidden_states: torch.Tensor, text: torch.Tensor,
                   temb: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The block's rows for this step, or None when the block should run its stock forward."""
        ctx = self.ctx
        if layer == 0:
            ctx.branch.hidden_in = hidden_states
            hidden_states = self._gather(hidden_states)
        if ctx.stock:
            return None
        if ctx.kind == "R":
            return hidden_states
        kv = self._layer_kv(ctx.branch.main_kv, layer, hidden_states)
        args = (block, hidden_states, temb, self._rope(rotary_emb), kv, self._text("main", layer, block.attn2, text),
                ctx.update)
        if ctx.select_now and layer == self.num_main - 1 and self._needs_scores():
            return block_rows(*args, probe=self._score_probe)  # eager: the probe stays out of compiled graphs
        return self.main_rows(*args)

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
        if ctx.kind == "R":
            return control, control
        kv = self._layer_kv(ctx.branch.vace_kv, layer, hidden_states)
        return self.vace_rows(block, hidden_states, control, temb, self._rope(rotary_emb), kv,
                              self._text("vace", layer, block.attn2, text), ctx.update)

    def assemble(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """norm_out's input: computed rows plus h_in + R elsewhere; refreshes R for the computed rows."""
        ctx = self.ctx
        if ctx is None or ctx.kind == "R":  # outside a transformer call, or `reuse_forward` assembled it already
            return hidden_states
        branch = ctx.branch
        hidden_in = branch.hidden_in.float()
        if ctx.kind == "F":
            residual = hidden_states - hidden_in
            dtype = self.config.cache_dtype or branch.hidden_in.dtype
            kept = branch.residual
            if ctx.update.in_place and kept is not None and kept.shape == residual.shape and kept.dtype == dtype:
                kept.copy_(residual)
            else:
                branch.residual = residual.to(dtype)
            if ctx.select_now:
                self._select_context(hidden_states)
            return hidden_states
        full = hidden_in + branch.residual.float()
        full.index_copy_(1, ctx.rows, hidden_states)
        fresh = hidden_states - hidden_in.index_select(1, ctx.rows)
        blend_rows(branch.residual, ctx.rows, fresh, ctx.update.blend)
        return full

    # ---------------------------------------------------------------------------------------------- selection
    def _needs_scores(self) -> bool:
        return self.config.selection in ("kmeans_attention", "attention")

    def _score_probe(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        generative = self.partition.generative
        q = query[0].index_select(0, generative).transpose(0, 1)
        self.ctx.scores = select.interaction_scores(q, keys[0].transpose(0, 1), max_queries=SCORE_QUERIES)

    def _select_context(self, hidden_states: torch.Tensor) -> None:
        cfg, part = self.config, self.partition
        self.selection_step = self.ctx.index
        self.step_rows.clear()
        if part.context.numel() == 0:
            self.context_choice = part.context
            return
        labels = None
        if cfg.selection in ("kmeans_attention", "kmeans"):
            features = hidden_states[0].index_select(0, part.context)
            labels = select.kmeans(features, cfg.kmeans_clusters, iters=cfg.kmeans_iters, seed=cfg.seed,
                                   max_points=KMEANS_POINTS)
        generator = torch.Generator().manual_seed(cfg.seed + self.ctx.index)
        self.context_choice = select.context_rows(
            part.context,
            select.context_count(int(part.context.numel()), cfg.context_ratio),
            strategy=cfg.selection,
            labels=labels,
            scores=self.ctx.scores,
            generator=generator,
        )
        self.stats.flops += flops.selection_flops(
            self.shape,
            part.num_tokens,
            min(int(part.generative.numel()), SCORE_QUERIES) if self._needs_scores() else 0,
            int(part.context.numel()) if labels is not None else 0,
            clusters=cfg.kmeans_clusters,
            iters=cfg.kmeans_iters,
            fit_points=KMEANS_POINTS,
        )


def resolve_plan(
    transformer: torch.nn.Module,
    config: HetCacheConfig,
    partition: tokens.TokenPartition,
    text_len: int,
    *,
    timesteps: torch.Tensor | None,
    num_steps: int | None,
) -> tuple[str, float | None, list[str]]:
    """The step plan for one video: a fixed string, or thresholds / a budget over the timestep signal."""
    notes: list[str] = []
    if config.plan is not None:
        if num_steps is not None and len(config.plan) != num_steps:
            raise ValueError(f"plan has {len(config.plan)} letters but the run has {num_steps} steps")
        return plan.validate_plan(config.plan, len(config.plan)), None, notes
    if timesteps is None:
        raise ValueError("threshold and budget plans need the timesteps: use a pipeline, or pass timesteps= to enable")
    signal = plan.timestep_modulations(transformer, timesteps)
    coefficients = plan.TEACACHE_WAN21_COEFFICIENTS.get(plan.model_family(transformer.config) or "")
    distances = plan.step_distances(signal, coefficients)
    guards = dict(kappa=config.kappa, warmup_steps=config.warmup_steps, max_reuse=config.max_reuse,
                  refresh_every=config.refresh_every)
    if config.budget is None:
        return plan.plan_from_distances(distances, config.delta, **guards), config.delta, notes
    shape = flops.ModelShape.from_config(transformer.config)
    n = partition.num_tokens
    rows = partial_row_count(partition, config)
    costs = dict(
        full_cost=flops.forward_flops(shape, n, n, text_len, text_kv=False),
        partial_cost=flops.forward_flops(shape, n, rows, text_len, text_kv=False),
        reuse_cost=flops.forward_flops(shape, n, 0, text_len, text_kv=False),
    )
    delta, letters = plan.solve_budget(distances, config.budget, **costs, **guards)
    achieved = plan.plan_cost(letters, **costs) / (len(letters) * costs["full_cost"])
    if achieved > config.budget + 1e-9:
        notes.append(f"budget {config.budget:.2f} is below what the plan guards allow; cheapest plan costs {achieved:.2f}")
    return letters, delta, notes


def partial_row_count(partition: tokens.TokenPartition, config: HetCacheConfig) -> int:
    """Rows a PARTIAL step computes: all generative, ceil(rho_m |M|) margin, ceil(rho_c |C|) context tokens."""
    counts = partition.counts()
    margin = select.context_count(counts["margin"], config.margin_ratio)
    return counts["generative"] + margin + select.context_count(counts["context"], config.context_ratio)


def reuse_forward(transformer: torch.nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor,
                  text: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A REUSE call: patch embedding, h_in + R, the output head. Nothing else of the forward is needed, so
    it is not run (the VACE embedding, RoPE tables, the text projection and 45 no-op block calls cost more
    than the arithmetic here). The head follows `WanVACETransformer3DModel.forward`'s step 6."""
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = transformer.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    embedder = transformer.condition_embedder
    timestep = embedder.timesteps_proj(timestep)
    time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
    temb = embedder.time_embedder(timestep.to(time_dtype)).type_as(text)
    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    hidden = tokens.float() + residual.float()
    hidden = (transformer.norm_out(hidden) * (1 + scale) + shift).type_as(tokens)
    hidden = transformer.proj_out(hidden)
    hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


# ------------------------------------------------------------------------------------------------------ hooks
class TransformerHook(ModelHook):
    """Root hook: decides what each call does and keeps per-branch state (the only stateful hook)."""

    _is_stateful = True

    def __init__(self, engine: HetCacheEngine) -> None:
        super().__init__()
        self.engine = engine
        self.state_manager = StateManager(BranchState)
        engine._states = self.state_manager._state_cache

    def _branch(self) -> tuple[BranchState, str]:
        if self.state_manager._context is None:
            self.state_manager.set_context(CacheContext(DEFAULT_CONTEXT))
        return self.state_manager.get_state(), self.state_manager.context.name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden_states = _call_arg(args, kwargs, 0, "hidden_states")
        timestep = _call_arg(args, kwargs, 1, "timestep")
        text = _call_arg(args, kwargs, 2, "encoder_hidden_states")
        branch, name = self._branch()
        self.engine.begin_call(hidden_states, timestep, text, branch, name)
        try:
            ctx = self.engine.ctx
            if ctx.kind == "P" and self.engine.graphs_active:
                return self.engine.graphs.run(name, ctx.rows, args, kwargs, self.fn_ref.original_forward,
                                              self.engine.use_rows)
            if ctx.kind != "R":
                return self.fn_ref.original_forward(*args, **kwargs)
            with torch.no_grad():
                output = reuse_forward(module, hidden_states, timestep, text, branch.residual)
            return Transformer2DModelOutput(sample=output) if _call_arg(args, kwargs, 6, "return_dict") in (
                None, True) else (output,)
        finally:
            self.engine.end_call()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        self.engine.end_video()
        return module


class MainBlockHook(ModelHook):
    def __init__(self, engine: HetCacheEngine, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_states, text, temb, rotary_emb = (_call_arg(args, kwargs, i, name) for i, name in enumerate(
            ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")))
        with torch.no_grad():
            out = self.engine.main_block(module, self.layer, hidden_states, text, temb, rotary_emb)
        return self.fn_ref.original_forward(*args, **kwargs) if out is None else out


class VaceBlockHook(ModelHook):
    def __init__(self, engine: HetCacheEngine, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = engine, layer

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, text, control, temb, rotary_emb = (_call_arg(args, kwargs, i, name) for i, name in enumerate(
            ("hidden_states", "encoder_hidden_states", "control_hidden_states", "temb", "rotary_emb")))
        with torch.no_grad():
            out = self.engine.vace_block(module, self.layer, hidden_states, text, control, temb, rotary_emb)
        return self.fn_ref.original_forward(*args, **kwargs) if out is None else out


class OutputNormHook(ModelHook):
    def __init__(self, engine: HetCacheEngine) -> None:
        super().__init__()
        self.engine = engine

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        with torch.no_grad():
            return (self.engine.assemble(args[0]),), kwargs


def attach(transformer: torch.nn.Module, engine: HetCacheEngine) -> None:
    """Register the engine's hooks on a WanVACETransformer3DModel."""
    for index, block in enumerate(transformer.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(MainBlockHook(engine, index), HOOK_NAME)
    for index, block in enumerate(transformer.vace_blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(VaceBlockHook(engine, index), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(transformer.norm_out).register_hook(OutputNormHook(engine), HOOK_NAME)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(TransformerHook(engine), HOOK_NAME)
    registry.invalidate_child_registries_cache()


def detach(transformer: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    root = registry.get_hook(HOOK_NAME)
    if root is not None and root._is_stateful:
        root.reset_state(transformer)
    registry.remove_hook(HOOK_NAME, recurse=True)
    registry.invalidate_child_registries_cache()


def engine_of(transformer: torch.nn.Module) -> HetCacheEngine | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.engine if hook is not None else None
