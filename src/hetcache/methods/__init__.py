"""The methods a user can compare: names for the CLI's `--method`, and their configs for `hetcache.enable`.

    config = method_config("pab")                      # PAB with its defaults
    config = method_config("teacache", delta=0.05)     # overrides go to the config
    config = method_config("teacache", steps=20)       # step-count dependent defaults fitted to a 20-step run
    exact = method_config("adacache", never_skip=True)  # reproduces `full` bitwise (validation)

Every config is accepted by `hetcache.enable(pipe, config)`: HetCache and TeaCache are `HetCacheConfig`s run by
the engine; the others implement `attach(transformer, pipeline)`. `method_flag` names the methods whose results
need a caveat next to them (known to be wrong on VACE, or a deviation from the paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.methods.adacache import AdaCacheConfig
from hetcache.methods.fastcache import DEVIATION as FASTCACHE_DEVIATION
from hetcache.methods.fastcache import FastCacheConfig
from hetcache.methods.pab import PABConfig
from hetcache.methods.peers import (
    VACE_HINTS_TWICE,
    CacheDitMethod,
    DiffusersCacheMethod,
    cache_dit_available,
    diffusers_cache_fields,
)
from hetcache.methods.simple import FewerStepsConfig, FullConfig
from hetcache.methods.teacache import teacache_config

# `bench`'s default list: the reference, the simple baselines, the baseline caches and the two HetCache presets.
OWN_METHODS = ("full", "fewer-steps", "teacache", "pab", "adacache", "fastcache-style", "hetcache-slow",
               "hetcache-fast")
# HetCache with every knob open (the slow budget unless a delta, budget or plan is given): what sweeps vary and
# `--method-option hetcache.KEY=VALUE` sets. The presets are two of its points.
TUNABLE_METHODS = ("hetcache",)
PEER_METHODS = ("diffusers-fbc", "diffusers-magcache", "cache-dit")
METHOD_NAMES = OWN_METHODS + TUNABLE_METHODS + PEER_METHODS

# Each factory takes the run's step count (None: unknown) and the user's options.
_FACTORIES: dict[str, Callable[..., Any]] = {
    "full": lambda steps, **options: FullConfig(**options),
    "fewer-steps": lambda steps, **options: FewerStepsConfig(**options),
    "teacache": lambda steps, **options: teacache_config(steps=steps, **options),
    "pab": lambda steps, **options: PABConfig(**options),
    "adacache": lambda steps, **options: AdaCacheConfig(**options),
    "fastcache-style": lambda steps, **options: FastCacheConfig(**options),
    "hetcache-slow": lambda steps, **options: HetCacheConfig.slow(**options),
    "hetcache-fast": lambda steps, **options: HetCacheConfig.fast(**options),
    "hetcache": lambda steps, **options: HetCacheConfig(**options),
    "diffusers-fbc": lambda steps, **options: DiffusersCacheMethod("fbc", options),
    "diffusers-magcache": lambda steps, **options: DiffusersCacheMethod("magcache", options),
    "cache-dit": lambda steps, **options: CacheDitMethod(options),
}

_FLAGS = {
    "diffusers-fbc": VACE_HINTS_TWICE,
    "diffusers-magcache": VACE_HINTS_TWICE,
    "fastcache-style": FASTCACHE_DEVIATION,
}


def check_method_name(name: str) -> str:
    """The name itself, or a UserError listing the valid ones."""
    if name not in _FACTORIES:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)}")
    return name


def method_config(name: str, *, steps: int | None = None, never_skip: bool = False, **overrides: Any) -> Any:
    """The config of method `name` (its defaults, with `overrides` applied) for a run of `steps` steps.

    `steps` fits the defaults that a method's authors gave for one step count to this one (TeaCache's warm-up
    steps); None keeps them as published. With `never_skip=True` the same method under a setting that reuses
    nothing, so that its output equals `full`'s bitwise: a plan of only FULL steps (delta 0) for the engine
    methods, broadcast ranges of 1 for PAB, a codebook of rate 1 for AdaCache, both FastCache parts off, all
    steps for fewer-steps, and thresholds no step can pass for the peers. The hooks stay attached, so this
    checks the plumbing, not just the defaults.
    """
    config = _FACTORIES[check_method_name(name)](steps, **overrides)
    if not never_skip:
        return config
    if isinstance(config, HetCacheConfig):
        return dataclasses.replace(config, plan=None, budget=None, delta=0.0)
    return config.never_skip()


def method_options(name: str) -> tuple[str, ...] | None:
    """The option names method `name` accepts (`method_config` overrides), or None when they cannot be listed
    here (cache-dit's, checked by cache-dit itself)."""
    config = _FACTORIES[check_method_name(name)](None)
    if isinstance(config, DiffusersCacheMethod):
        return diffusers_cache_fields(config.kind)
    if isinstance(config, CacheDitMethod):
        return None
    return tuple(field.name for field in dataclasses.fields(config))


def check_options(name: str, options: dict[str, Any], steps: int | None = None) -> dict[str, Any]:
    """`options` when method `name` accepts them (known keys, values its config accepts); a UserError naming the
    method, the option and the valid keys otherwise."""
    known = method_options(name)
    if known is not None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r} for {name}: use one of {', '.join(known)}")
    try:
        config = method_config(name, steps=steps, **options)
        if isinstance(config, DiffusersCacheMethod):
            config.check()
    except (TypeError, ValueError) as error:
        raise UserError(f"options {options} for {name}: {error}") from None
    return options


def method_flag(name: str) -> str | None:
    """The caveat every result of method `name` carries ("wrong on VACE: ..." or "deviation: ..."), or None."""
    return _FLAGS.get(name)


def short_flag(flag: str | None) -> str:
    """A flag's first words, before its colon ("wrong on VACE", "deviation"), for table cells; "" for None."""
    return "" if not flag else flag.split(":")[0]


def inference_steps(config: Any, steps: int) -> int:
    """The number of steps a method runs when the benchmark asks for `steps` (fewer-steps runs fewer)."""
    fraction = getattr(config, "steps_fraction", 1.0)
    return max(1, round(steps * fraction))


def unavailable_reason(name: str) -> str | None:
    """Why method `name` cannot run here (an optional extra that is not installed), or None."""
    if name == "cache-dit" and not cache_dit_available():
        return "cache-dit is not installed (pip install cache-dit, with your torch pinned)"
    return None


__all__ = [
    "METHOD_NAMES",
    "OWN_METHODS",
    "PEER_METHODS",
    "TUNABLE_METHODS",
    "check_method_name",
    "check_options",
    "inference_steps",
    "method_config",
    "method_flag",
    "method_options",
    "short_flag",
    "unavailable_reason",
]
