"""HetCacheConfig: every knob of the method in one validated dataclass (DESIGN sections 2-5)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetcache.forecast import ORDERS
from hetcache.select import SELECTION_STRATEGIES

REUSE_MODES = tuple(ORDERS)
CACHE_DEVICES = ("auto", "cuda", "cpu")


# Budgets (fractions of dense FLOPs) of the two presets: the FLOPs ratios reported for HetCache-slow and
# HetCache-fast in the HetCache paper (arXiv 2603.24260). Solving the plan from a budget keeps their cost
# predictable on checkpoints nobody calibrated a threshold for.
SLOW_BUDGET = 0.42
FAST_BUDGET = 0.33
# The plan family of both presets, chosen by measurement (docs/PLANS.md): FULL and PARTIAL steps only (a PARTIAL
# step recomputes every generative token, a REUSE step none), held rows, and at most three quarters of the solver
# steps, so a budget buys more solver steps where they pay and FULL steps where more steps no longer do.
PRESET_FAMILY: dict[str, Any] = {"max_reuse": 0, "reuse": "hold", "max_step_fraction": 0.75}
# The fields that decide the step plan; a config may set at most one of them.
PLAN_SOURCES = ("plan", "budget", "delta")


@dataclass
class HetCacheConfig:
    """How HetCache plans steps and picks tokens.

    At most one of `plan`, `budget` and `delta` may be given (a config with two of them is refused): it decides the
    step plan; with none of them the `slow` budget is used.

    - `delta`, `kappa`: accumulated step distance below `delta` reuses, below `kappa * delta` computes PARTIAL,
      otherwise FULL.
    - `plan`: one letter per denoising step (`F`, `P`, `R`), overriding the thresholds.
    - `budget`: target fraction of dense FLOPs in (0, 1]; the smallest `delta` meeting it is solved once the mask
      is known.
    - `warmup_steps`, `max_reuse`, `refresh_every`: guards of the plan (first steps FULL, at most `max_reuse`
      REUSE in a row, a FULL at least every `refresh_every` computed steps). The last step is always FULL.
      `max_reuse=0` gives plans of FULL and PARTIAL steps only.
    - `margin` (tokens), `temporal_margin` (latent frames), `gen_threshold`: the token partition.
    - `margin_ratio`, `context_ratio`: the shares of margin and context tokens recomputed by a PARTIAL step.
    - `selection`, `kmeans_clusters`, `kmeans_iters`: how context tokens are chosen at FULL steps.
    - `ema_alpha`: 0 replaces cached rows of non-generative tokens with fresh ones; alpha > 0 blends
      `alpha * old + (1 - alpha) * new`.
    - `step_fraction`: the share of the requested solver steps that run (S' = round(S x step_fraction), at least
      1; the scheduler spreads them over the same noise range); the plan letters apply to those S' steps. None:
      every step, except that a `budget` then solves S' jointly with the letters (the largest S' that meets it).
    - `max_step_fraction`: caps the S' that a budget solves for at floor(max(max_step_fraction, budget) x S) (None: no
      cap). Without a cap the joint solve takes the most steps the budget allows, which fills them with PARTIAL
      steps; past some step count, more solver steps gain less than what the extra PARTIAL steps lose (docs/PLANS.md
      measures it), and a budget at or above the cap runs fewer solver steps, all FULL. No effect where
      `step_fraction`, a `plan` or a `delta` decides.
    - `reuse`: what rows that are not computed at a step read from the caches: "hold" their last computed value,
      "linear" / "quadratic" an extrapolation of their last two / three values in the timestep (REUSE steps'
      residual, and the residual and K/V of the rows a PARTIAL step skips). Each order keeps one more copy of
      every cache buffer.
    - `cache_dtype`: dtype of the stored K/V (default: the model's dtype); what attention reads and the residual
      stay in the compute dtype.
    - `cache_device`: where the K/V live. "cuda": on the model's device. "cpu": in pinned host memory (the host
      tier, `hetcache.tier`): each layer's K/V are fetched to the GPU while the layer before computes and sent back
      after, so only two layers' worth stay on the GPU. "auto" (default): on the model's device when the
      estimate (`hetcache.memory`) fits its free memory with a margin, else on the host; the choice is in
      `stats.notes`. On a CPU-only machine the host is the device ("cpu" then runs the tier's code anyway).
    - `host_share`: with the cache on the host, the share of the layers kept there (spread over the execution
      order); the others stay on the device.
    - `seed`: seeds k-means initialisation and the `random` strategy.
    - `compile`: run the engine's block maths through `torch.compile` (dynamic row counts, one graph shared by
      all blocks of a kind). On a GPU, PARTIAL steps with few rows are bound by kernel launches in eager mode;
      compiling fuses the elementwise work and removes most of that overhead. The first call compiles.
    - `cuda_graphs`: replay PARTIAL forwards on CUDA as graphs (`hetcache.graphs`): no host launch overhead, which
      is what bounds PARTIAL steps at small r. Used for videos whose PARTIAL steps compute at most 30 % of the
      tokens, on the current CUDA device, without offloading hooks; captured once per CFG branch and row count
      at the second PARTIAL step; each graph keeps its own memory for the step's activations; FULL steps then
      write K/V in place. The output is that of eager execution (the same kernels on the same inputs). No
      effect on the CPU.
    """

    delta: float | None = None
    kappa: float = 1.5
    plan: str | None = None
    budget: float | None = None
    warmup_steps: int = 2
    max_reuse: int = 3
    refresh_every: int = 4
    margin: int = 3
    temporal_margin: int = 0
    gen_threshold: float = 0.0
    margin_ratio: float = 0.7
    context_ratio: float = 0.05
    selection: str = "kmeans_attention"
    kmeans_clusters: int = 16
    kmeans_iters: int = 8
    ema_alpha: float = 0.0
    step_fraction: float | None = None
    max_step_fraction: float | None = None
    reuse: str = "hold"
    cache_dtype: torch.dtype | None = None
    cache_device: str = "auto"
    host_share: float = 1.0
    seed: int = 0
    compile: bool = False
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.plan is not None:
            self.plan = self.plan.strip().upper()
            if not self.plan or set(self.plan) - set("FPR"):
                raise ValueError(f"plan must be letters F, P and R, got {self.plan!r}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.delta is not None and self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        deciding = [name for name in PLAN_SOURCES if getattr(self, name) is not None]
        if len(deciding) > 1:
            raise ValueError(
                f"{' and '.join(deciding)} each decide the step plan: give only one of them (the others None)"
            )
        if self.plan is None and self.budget is None and self.delta is None:
            self.budget = SLOW_BUDGET
        if self.kappa < 1.0:
            raise ValueError(f"kappa must be >= 1, got {self.kappa}")
        for name in ("warmup_steps", "max_reuse", "margin", "temporal_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("refresh_every", "kmeans_clusters", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("margin_ratio", "context_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.gen_threshold < 1.0:
            raise ValueError(f"gen_threshold must be in [0, 1), got {self.gen_threshold}")
        if not 0.0 <= self.ema_alpha < 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1), got {self.ema_alpha}")
        if self.step_fraction is not None and not 0.0 < self.step_fraction <= 1.0:
            raise ValueError(f"step_fraction must be in (0, 1], got {self.step_fraction}")
        if isinstance(self.cache_dtype, str):
            self.cache_dtype = cache_dtype_named(self.cache_dtype)
        if self.cache_dtype is not None and not (isinstance(self.cache_dtype, torch.dtype)
                                                 and self.cache_dtype.is_floating_point):
            raise ValueError(f"cache_dtype must be a floating-point torch dtype, got {self.cache_dtype!r}")
        if self.max_step_fraction is not None and not 0.0 < self.max_step_fraction <= 1.0:
            raise ValueError(f"max_step_fraction must be in (0, 1], got {self.max_step_fraction}")
        if self.cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device must be one of {', '.join(CACHE_DEVICES)}, got {self.cache_device!r}")
        if not 0.0 < self.host_share <= 1.0:
            raise ValueError(f"host_share must be in (0, 1], got {self.host_share}")
        if self.reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {', '.join(REUSE_MODES)}, got {self.reuse!r}")
        if self.selection not in SELECTION_STRATEGIES:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_STRATEGIES)}, got {self.selection!r}")

    @classmethod
    def slow(cls, **overrides: Any) -> HetCacheConfig:
        """HetCache-slow: at most 42 % of dense FLOPs, in the presets' family (`PRESET_FAMILY`: FULL and PARTIAL
        steps over at most 3/4 of the solver steps). A `delta` or `plan` in `overrides` replaces the budget
        (slow(delta=0.2) plans by thresholds); any other field overrides the family's."""
        return cls(**_preset(SLOW_BUDGET, overrides))

    @classmethod
    def fast(cls, **overrides: Any) -> HetCacheConfig:
        """HetCache-fast: at most 33 % of dense FLOPs, in the presets' family. A `delta` or `plan` in `overrides`
        replaces the budget."""
        return cls(**_preset(FAST_BUDGET, overrides))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (dtypes as strings)."""
        out = dataclasses.asdict(self)
        out["cache_dtype"] = None if self.cache_dtype is None else str(self.cache_dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HetCacheConfig:
        """The config `to_dict` wrote (unknown keys and bad values are refused with the field's name)."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown HetCacheConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HetCacheConfig:
        """Load a config JSON file: a `to_dict` object, or a `hetcache calibrate` choice (its "config" entry)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no HetCacheConfig object")
        return cls.from_dict(data)

def cache_dtype_named(name: str) -> torch.dtype:
    """The floating-point torch dtype a name gives ("bfloat16", "float8_e4m3fn", "torch.float16", ...)."""
    dtype = getattr(torch, name.strip().removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"cache_dtype {name!r} is not a floating-point torch dtype: use e.g. bfloat16, float16 or "
                         "float8_e4m3fn")
    return dtype


def _preset(budget: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's options: its family and budget under the overrides, the budget dropped when the overrides choose
    how the plan is decided themselves."""
    if any(overrides.get(name) is not None for name in PLAN_SOURCES):
        return {**PRESET_FAMILY, "budget": None, **overrides}
    return {**PRESET_FAMILY, **overrides, "budget": budget}
