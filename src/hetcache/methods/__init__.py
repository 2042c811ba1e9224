"""The methods a user can compare: names for the CLI's `--method`, and their configs for `hetcache.enable`.

    config = method_config("pab")                      # PAB with its defaults
    config = method_config("teacache", delta=0.05)     # overrides go to the config
    exact = method_config("adacache", never_skip=True)  # reproduces `full` bitwise (validation)

Every config is accepted by `hetcache.enable(pipe, config)`: HetCache presets and TeaCache are `HetCacheConfig`s
run by the engine; the others implement `attach(transformer, pipeline)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.methods.adacache import AdaCacheConfig
from hetcache.methods.fastcache import FastCacheConfig
from hetcache.methods.pab import PABConfig
from hetcache.methods.peers import CacheDitMethod, DiffusersCacheMethod, cache_dit_available
from hetcache.methods.simple import FewerStepsConfig, FullConfig
from hetcache.methods.teacache import teacache_config

OWN_METHODS = ("full", "fewer-steps", "teacache", "pab", "adacache", "fastcache", "hetcache-slow", "hetcache-fast")
PEER_METHODS = ("diffusers-fbc", "diffusers-magcache", "cache-dit")
METHOD_NAMES = OWN_METHODS + PEER_METHODS

_FACTORIES = {
    "full": FullConfig,
    "fewer-steps": FewerStepsConfig,
    "teacache": teacache_config,
    "pab": PABConfig,
    "adacache": AdaCacheConfig,
    "fastcache": FastCacheConfig,
    "hetcache-slow": lambda **options: dataclasses.replace(HetCacheConfig.slow(), **options),
    "hetcache-fast": lambda **options: dataclasses.replace(HetCacheConfig.fast(), **options),
    "diffusers-fbc": lambda **options: DiffusersCacheMethod("fbc", options),
    "diffusers-magcache": lambda **options: DiffusersCacheMethod("magcache", options),
    "cache-dit": lambda **options: CacheDitMethod(options),
}


def check_method_name(name: str) -> str:
    """The name itself, or a UserError listing the valid ones."""
    if name not in _FACTORIES:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)}")
    return name


def method_config(name: str, *, never_skip: bool = False, **overrides: Any) -> Any:
    """The config of method `name` (its defaults, with `overrides` applied).

    With `never_skip=True` the same method under a setting that reuses nothing, so that its output equals
    `full`'s bitwise: a plan of only FULL steps (delta 0) for the engine methods, broadcast ranges of 1 for PAB,
    a codebook of rate 1 for AdaCache, both FastCache parts off, all steps for fewer-steps, and thresholds no step
    can pass for the peers. The hooks stay attached, so this checks the plumbing, not just the defaults.
    """
    config = _FACTORIES[check_method_name(name)](**overrides)
    if not never_skip:
        return config
    if isinstance(config, HetCacheConfig):
        return dataclasses.replace(config, plan=None, budget=None, delta=0.0)
    return config.never_skip()


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
    "check_method_name",
    "inference_steps",
    "method_config",
    "unavailable_reason",
]
