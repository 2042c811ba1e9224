"""External caches run as their authors ship them: diffusers' FirstBlockCache and MagCache, cache-dit's DBCache.

They are wrapped only so the benchmark can treat them like the other methods: `attach` registers observer hooks
under `core.HOOK_NAME` (a root hook for the stats, and on diffusers' caches one hook per main and VACE block that
records which blocks ran), then enables the cache through the peer's own entry point; `hetcache.disable` removes
the observers, and removing the root hook disables the peer's cache too.

VACE behaviour (measured in the research notes on a tiny WanVACE model fed the same inputs every step):
diffusers' FirstBlockCache and MagCache hook only `transformer.blocks`. Their cached residual (tail output - head
input) already contains the VACE hints added after the main blocks, but on a skipped step the transformer loop
still adds fresh hints after the pass-through blocks, so the hints count twice (max abs error 0.33 on the tiny
model where an exact cache gives 0); the VACE blocks themselves run every step. cache-dit's DBCache patches the
VACE transformer so that each block adds its own hint (no double add) and also runs the VACE blocks every step.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hetcache import flops
from hetcache.methods import base

MAGCACHE_LOGGER = "diffusers.hooks.mag_cache"
_MAGCACHE_RESULT = "MagCache Calibration Results:"
# The caveat every FirstBlockCache and MagCache result carries (see the module docstring).
VACE_HINTS_TWICE = "wrong on VACE: skipped steps add the VACE hints twice (diffusers caches the main blocks only)"
# cache-dit's DBCache defaults (F8B0, 8 warm-up steps), lowered only where they do not fit the model or the run.
CACHE_DIT_COMPUTE_BLOCKS = 8
CACHE_DIT_WARMUP_STEPS = 8


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


class ObserverRuntime(base.MethodRuntime):
    """Stats of a foreign cache: which blocks ran in each call (when observed) and their analytic cost."""

    def __init__(self, transformer: torch.nn.Module, config: Any, scheduler: Any = None,
                 on_detach: Callable[[], None] | None = None, observe_blocks: bool = True) -> None:
        super().__init__(transformer, config, scheduler)
        self.on_detach = on_detach
        self.observe_blocks = observe_blocks
        self._ran: list[tuple[str, int]] = []

    def begin_call(self, call: base.Call, args: tuple, kwargs: dict) -> None:
        self._ran = []

    def observer(self, key: tuple[str, int]):
        def handler(original, *args: Any, **kwargs: Any) -> Any:
            self._ran.append(key)
            return original(*args, **kwargs)

        return handler

    def end_call(self, call: base.Call) -> tuple[str, float, int]:
        if not self.observe_blocks:
            return "?", 0.0, call.tokens
        cost = flops.embed_flops(self.shape, call.tokens, call.text_len)
        for group, layer in self._ran:
            if group == "main":
                cost += base.main_block_flops(self.shape, call.tokens, call.text_len)
            else:
                cost += base.vace_block_flops(self.shape, call.tokens, call.text_len, layer)
        main_ran = sum(group == "main" for group, _ in self._ran)
        letter = "F" if main_ran == len(self.transformer.blocks) else ("R" if not self._ran else "P")
        return letter, cost, call.tokens

    def finish(self) -> None:
        super().finish()
        if not self.observe_blocks:
            self.stats.dense_flops = 0.0  # nothing observed: the cost is unknown, not dense

    def detach(self) -> None:
        if self.on_detach is not None:
            self.on_detach()
            self.on_detach = None


@dataclass
class DiffusersCacheMethod:
    """diffusers' FirstBlockCacheConfig (`kind="fbc"`) or MagCacheConfig (`kind="magcache"`) through
    `transformer.enable_cache`, with `options` passed to the config unchanged.

    MagCache needs checkpoint-specific `mag_ratios`; diffusers ships them for FLUX only. Without them `prepare`
    follows the authors' recipe: one calibration run with `MagCacheConfig(calibrate=True)` on the same inputs,
    whose logged ratios (cond branch) become `mag_ratios`.
    """

    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("fbc", "magcache"):
            raise ValueError(f"kind must be 'fbc' or 'magcache', got {self.kind!r}")

    def cache_config(self) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

        return (FirstBlockCacheConfig if self.kind == "fbc" else MagCacheConfig)(**self.options)

    def check(self) -> None:
        """Let diffusers check the options now (TypeError / ValueError), before any run; MagCache's `mag_ratios`,
        which `prepare` calibrates when they are not given, stand in as 1s."""
        placeholder = {"mag_ratios": [1.0]} if self.kind == "magcache" else {}
        dataclasses.replace(self, options={**placeholder, **self.options}).cache_config()

    def prepare(self, transformer: torch.nn.Module, steps: int, run: Callable[[], Any]) -> None:
        """Before a run of `steps` steps; `run()` runs the pipeline once on the benchmark's inputs."""
        if self.kind != "magcache":
            return
        self.options.setdefault("num_inference_steps", steps)
        if self.options.get("mag_ratios") is None:
            self.options["mag_ratios"] = calibrate_mag_ratios(transformer, steps, run)

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> ObserverRuntime:
        config = self.cache_config()  # fail before any hook is registered
        runtime = ObserverRuntime(transformer, self, base.scheduler_of(pipeline), on_detach=transformer.disable_cache)
        hooks = [(b, base.ForwardHook(runtime.observer(("main", i)))) for i, b in enumerate(transformer.blocks)]
        hooks += [(b, base.ForwardHook(runtime.observer(("vace", i)))) for i, b in enumerate(transformer.vace_blocks)]
        base.attach(transformer, runtime, hooks)  # observers first: the cache's block hooks wrap them
        transformer.enable_cache(config)
        return runtime

    def never_skip(self) -> DiffusersCacheMethod:
        """Thresholds no step can pass: FBC computes when the change exceeds -1, MagCache skips at error <= -1."""
        if self.kind == "fbc":
            return dataclasses.replace(self, options={**self.options, "threshold": -1.0})
        return dataclasses.replace(self, options={**self.options, "threshold": -1.0, "mag_ratios": [1.0]})

    def to_dict(self) -> dict[str, Any]:
        options = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.options.items()}
        return {"kind": self.kind, "options": options}


def diffusers_cache_fields(kind: str) -> tuple[str, ...]:
    """The options diffusers' FirstBlockCacheConfig (`fbc`) or MagCacheConfig (`magcache`) accepts."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig

    return tuple(f.name for f in dataclasses.fields(FirstBlockCacheConfig if kind == "fbc" else MagCacheConfig))


def calibrate_mag_ratios(transformer: torch.nn.Module, steps: int, run: Callable[[], Any]) -> list[float]:
    """MagCache's own calibration: enable it with calibrate=True, run once, read the ratios it logs."""
    from diffusers.hooks import MagCacheConfig

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(_MAGCACHE_RESULT):
                records.append(message[len(_MAGCACHE_RESULT):].strip())

    logger = logging.getLogger(MAGCACHE_LOGGER)
    handler, level, propagate = Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # keep the INFO lines off diffusers' console handler
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibration also prints the ratios
            run()
    finally:
        transformer.disable_cache()
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    if not records:
        raise RuntimeError("MagCache calibration logged no ratios")
    return [float(r) for r in ast.literal_eval(records[0])]


@dataclass
class CacheDitMethod:
    """cache-dit's DBCache through `cache_dit.enable_cache(pipe)`, with `options` passed to
    `cache_dit.DBCacheConfig`. cache-dit replaces the transformer's forward with its own, so only the calls are
    observed: plan letters are "?" and FLOPs are unknown. Needs the pipeline, not a bare transformer.

    cache-dit's defaults (F8B0: 8 compute blocks first, 8 warm-up steps) fail on models of 8 blocks or fewer and
    leave nothing to cache in runs of 8 steps or fewer; `prepare` fits them (`fitted_options`). Enabling the
    cache is not exercised by hetcache's tests (cache-dit is an optional extra, absent from the test machines)."""

    options: dict[str, Any] = field(default_factory=dict)

    def prepare(self, transformer: torch.nn.Module, steps: int, run: Callable[[], Any]) -> None:
        """Before a run of `steps` steps: fit the defaults to the model's block count and the step count."""
        self.options = fitted_options(self.options, len(transformer.blocks), steps)

    def attach(self, transformer: torch.nn.Module, pipeline: Any = None) -> ObserverRuntime:
        if pipeline is None:
            raise ValueError("cache-dit needs the pipeline: pass the WanVACEPipeline to hetcache.enable")
        import cache_dit

        if self.options:
            cache_dit.enable_cache(pipeline, cache_config=cache_dit.DBCacheConfig(**self.options))
        else:
            cache_dit.enable_cache(pipeline)
        runtime = ObserverRuntime(transformer, self, base.scheduler_of(pipeline),
                                  on_detach=lambda: cache_dit.disable_cache(pipeline), observe_blocks=False)
        return base.attach(transformer, runtime)

    def never_skip(self) -> CacheDitMethod:
        return dataclasses.replace(self, options={**self.options, "residual_diff_threshold": 0.0})

    def to_dict(self) -> dict[str, Any]:
        return {"options": dict(self.options)}


def fitted_options(options: dict[str, Any], num_blocks: int, steps: int) -> dict[str, Any]:
    """cache-dit options that fit a model of `num_blocks` main blocks and a run of `steps` steps: the given ones,
    plus DBCache's defaults lowered where needed (front compute blocks below the block count less the back
    compute blocks, at least 1; warm-up steps below the step count)."""
    back = int(options.get("Bn_compute_blocks", 0))
    fitted = {
        "Fn_compute_blocks": max(1, min(CACHE_DIT_COMPUTE_BLOCKS, num_blocks - back - 1)),
        "max_warmup_steps": max(0, min(CACHE_DIT_WARMUP_STEPS, steps - 1)),
    }
    return {**fitted, **options}
