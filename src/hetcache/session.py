"""One video's shared state: its token partition, plan, selected rows, RoPE rows and stats.

Both CFG branches share all of it (DESIGN section 5); what differs per branch lives in the cache store. A session
starts at the first transformer call of a video (when the token grid and the text length are known) and ends
when the pipeline resets its hooks or a call starts the video again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hetcache import flops, plan, select, tokens
from hetcache.config import HetCacheConfig
from hetcache.core import CacheStats
from hetcache.sparse import RowRope

# Selection at FULL steps: interaction scores from at most this many generative queries, k-means centres fitted on
# at most this many context tokens. Both keep the selection near 1 % of a FULL CFG step at 480p (docs/BENCHMARKS.md).
SCORE_QUERIES = 1024
KMEANS_POINTS = 2048


def pixel_partition(config: HetCacheConfig, pixel_mask: torch.Tensor, patch_size: tuple[int, int, int],
                    num_reference_frames: int = 0) -> tokens.TokenPartition:
    """The partition of a video whose pixel mask [F, H, W] (True = generate) is known before any transformer call."""
    frames, rows, cols = tokens.latent_grid(tuple(pixel_mask.shape), patch_size)
    return tokens.partition_from_pixel_mask(
        pixel_mask, (frames + num_reference_frames, rows, cols), margin=config.margin,
        gen_threshold=config.gen_threshold, temporal_margin=config.temporal_margin,
        num_reference_frames=num_reference_frames)


class EditMask:
    """Where the edit mask comes from: a pipeline call (recorded by `enable`'s `prepare_masks` wrapper) or the user
    (`enable(..., mask=)` / `set_mask`, for direct transformer calls)."""

    def __init__(self) -> None:
        self.user: tuple[torch.Tensor, bool] | None = None  # (mask, is_token_coverage)
        self.call: tuple[torch.Tensor, int] | None = None  # (pixel mask, reference frames) of a pipeline call
        # A pipeline call's mask as its input check sees it, before the scheduler is set: (pixel mask maker,
        # reference frames). Made only when the solver step count depends on it.
        self.early: tuple[Callable[[], torch.Tensor], int] | None = None

    def early_partition(self, config: HetCacheConfig, patch_size: tuple[int, int, int]) -> tokens.TokenPartition | None:
        """The partition before the first transformer call: from the pipeline call's input or the user's pixel
        mask (None when neither is known)."""
        if self.early is not None:
            make_mask, references = self.early
            return pixel_partition(config, make_mask(), patch_size, references)
        if self.user is not None and not self.user[1]:
            return pixel_partition(config, self.user[0] > 0.5, patch_size)
        if self.user is not None:
            return tokens.partition_tokens(self.user[0].float(), margin=config.margin,
                                           gen_threshold=config.gen_threshold,
                                           temporal_margin=config.temporal_margin)
        return None

    def partition(self, config: HetCacheConfig, grid: tuple[int, int, int], device: torch.device) -> tokens.TokenPartition:
        options = dict(margin=config.margin, gen_threshold=config.gen_threshold, temporal_margin=config.temporal_margin)
        if self.call is not None:
            pixel_mask, references = self.call
            return tokens.partition_from_pixel_mask(
                pixel_mask.to(device), grid, num_reference_frames=references, **options
            )
        if self.user is None:
            partial_possible = "P" in config.plan if config.plan else config.kappa > 1.0
            if not partial_possible:  # a timestep-level plan (TeaCache): no token is treated apart
                return tokens.partition_tokens(torch.ones(grid, device=device), margin=0)
            raise ValueError(
                "hetcache needs the edit mask: call the pipeline with mask=..., or pass mask= to hetcache.enable "
                "(or hetcache.set_mask) when calling the transformer directly"
            )
        mask, is_coverage = self.user
        if not is_coverage:
            return tokens.partition_from_pixel_mask(mask.to(device), grid, **options)
        coverage = mask.to(device=device, dtype=torch.float32)
        refs = grid[0] - coverage.shape[0]
        if refs < 0 or tuple(coverage.shape[1:]) != grid[1:]:
            raise ValueError(f"token mask of shape {tuple(coverage.shape)} does not fit the token grid {grid}")
        return tokens.partition_tokens(coverage, num_reference_frames=refs, **options)


class VideoSession:
    """The partition, plan and selection of one video, and the stats of its calls."""

    def __init__(self, config: HetCacheConfig, shape: flops.ModelShape, partition: tokens.TokenPartition,
                 letters: str, delta: float | None, notes: list[str], text_len: int, first_branch: str,
                 requested_steps: int | None = None) -> None:
        self.config, self.shape, self.partition = config, shape, partition
        self.plan, self.text_len, self.first_branch = letters, text_len, first_branch
        requested = requested_steps or len(letters)
        self.dense_scale = requested / len(letters) if letters else 1.0  # dense steps per solver step run
        self.stats = CacheStats(planned=letters, delta=delta, tokens=partition.counts(), notes=notes,
                                requested_steps=requested)
        self.generative_flags = partition.labels() == tokens.GENERATIVE
        self.context_choice: torch.Tensor | None = None
        self.selection_step = -1
        self.step_rows: dict[int, torch.Tensor] = {}
        self.rope_full: RowRope | None = None
        self.rope_rows: dict[int, RowRope] = {}

    def kind(self, index: int) -> str:
        """The planned letter of step `index` (steps past the plan compute in full)."""
        return self.plan[index] if index < len(self.plan) else "F"

    @property
    def has_partial_steps(self) -> bool:
        return "P" in self.plan

    # ----------------------------------------------------------------------------------------------- rows
    def partial_rows(self, index: int) -> torch.Tensor:
        """Sorted rows of PARTIAL step `index`: all generative tokens, this phase's margin share, the chosen context."""
        if index not in self.step_rows:
            self.step_rows[index] = select.partial_rows(
                self.partition,
                margin_ratio=self.config.margin_ratio,
                context_ratio=self.config.context_ratio,
                phase=self.plan[:index].count("P"),
                context_choice=self.context_choice,
            )
        return self.step_rows[index]

    def blend(self, rows: torch.Tensor) -> torch.Tensor:
        """EMA weight of the old value per row: 0 for generative rows (always replaced), alpha elsewhere."""
        return torch.where(self.generative_flags[rows], 0.0, self.config.ema_alpha).float()

    def rope(self, rotary_emb: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor | None, index: int) -> RowRope:
        """RoPE tables of the computed rows (made once per video, and once per step for its rows)."""
        if self.rope_full is None:
            self.rope_full = RowRope.from_rotary_emb(rotary_emb)
        if rows is None:
            return self.rope_full
        if index not in self.rope_rows:
            self.rope_rows = {index: self.rope_full.rows(rows)}
        return self.rope_rows[index]

    # ------------------------------------------------------------------------------------------ accounting
    def account(self, branch: str, kind: str, computed: int, text_kv: bool) -> None:
        """Analytic FLOPs of one call (and of its dense counterpart), and its letter."""
        n = self.partition.num_tokens
        self.stats.flops += flops.forward_flops(self.shape, n, computed, self.text_len, text_kv=text_kv and computed > 0)
        dense = flops.forward_flops(self.shape, n, n, self.text_len, text_kv=True)
        self.stats.dense_flops += dense * self.dense_scale  # the stock pipeline runs every requested step
        self.stats.record(branch, kind, computed, branch == self.first_branch)

    # ------------------------------------------------------------------------------------------- selection
    @property
    def needs_scores(self) -> bool:
        return self.config.selection in ("kmeans_attention", "attention")

    def interaction_scores(self, query: torch.Tensor, keys: torch.Tensor,
                           gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Attention mass of the generative queries on every key (last main block of a FULL step). Under context
        parallelism `query` and `keys` have this rank's heads and `gather_heads` brings in the others'."""
        q = query[0].index_select(0, self.partition.generative).transpose(0, 1)
        return select.interaction_scores(q, keys[0].transpose(0, 1), max_queries=SCORE_QUERIES,
                                         gather_heads=gather_heads)

    @property
    def needs_features(self) -> bool:
        """Whether the context choice clusters the context tokens' last-block hidden states."""
        return self.config.selection in ("kmeans_attention", "kmeans")

    @property
    def context_size(self) -> int:
        """How many context rows every PARTIAL step computes."""
        return select.context_count(int(self.partition.context.numel()), self.config.context_ratio)

    def select_context(self, index: int, hidden_states: torch.Tensor | None, scores: torch.Tensor | None) -> None:
        """Choose the context rows of the PARTIAL steps until the next FULL step (DESIGN section 4)."""
        self.adopt_context(index, self.choose_context(index, hidden_states, scores))

    def choose_context(self, index: int, hidden_states: torch.Tensor | None,
                       scores: torch.Tensor | None) -> torch.Tensor:
        """The context rows chosen at FULL step `index` from every token's last-block hidden states [1, N, dim]
        (read only when `needs_features`) and the interaction scores."""
        cfg, part = self.config, self.partition
        if part.context.numel() == 0:
            return part.context
        labels = None
        if self.needs_features:
            features = hidden_states[0].index_select(0, part.context)
            labels = select.kmeans(features, cfg.kmeans_clusters, iters=cfg.kmeans_iters, seed=cfg.seed,
                                   max_points=KMEANS_POINTS)
        generator = torch.Generator().manual_seed(cfg.seed + index)
        return select.context_rows(
            part.context,
            self.context_size,
            strategy=cfg.selection,
            labels=labels,
            scores=scores,
            generator=generator,
        )

    def adopt_context(self, index: int, choice: torch.Tensor) -> None:
        """Make `choice` the context rows from FULL step `index` on, and count the selection's cost."""
        cfg, part = self.config, self.partition
        self.selection_step = index
        self.step_rows.clear()
        self.context_choice = choice
        if part.context.numel() == 0:
            return
        self.stats.flops += flops.selection_flops(
            self.shape,
            part.num_tokens,
            min(int(part.generative.numel()), SCORE_QUERIES) if self.needs_scores else 0,
            int(part.context.numel()) if self.needs_features else 0,
            clusters=cfg.kmeans_clusters,
            iters=cfg.kmeans_iters,
            fit_points=KMEANS_POINTS,
        )


def start_session(transformer: torch.nn.Module, config: HetCacheConfig, mask: EditMask,
                  grid: tuple[int, int, int], device: torch.device, text_len: int, timesteps: torch.Tensor | None,
                  num_steps: int | None, first_branch: str, requested_steps: int | None = None,
                  experts: plan.Experts | None = None) -> VideoSession:
    """The session of a video whose first call has token grid `grid`: partition, then the plan for its steps
    (`timesteps`: the solver steps that run; `requested_steps`: how many the caller asked for, when more)."""
    partition = mask.partition(config, grid, device)
    if timesteps is not None:
        num_steps = len(timesteps)
    elif config.plan is not None:
        num_steps = len(config.plan)
    if requested_steps is not None and num_steps is not None and requested_steps < num_steps:
        requested_steps = None  # the scheduler was set again without the wrapper: every step runs
    letters, delta, notes = plan.resolve_plan(
        transformer, config, partition, text_len, timesteps=timesteps, num_steps=num_steps,
        requested_steps=requested_steps, experts=experts)
    shape = flops.ModelShape.from_config(transformer.config)
    return VideoSession(config, shape, partition, letters, delta, notes, text_len, first_branch, requested_steps)
