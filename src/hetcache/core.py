"""What the HetCache engine and every baseline share: hook names, stats, the step of a call, call arguments.

Every method registers its hooks under HOOK_NAME, so `hetcache.disable` removes any of them the same way; calls
made outside a pipeline's `cache_context` run in DEFAULT_CONTEXT; `CacheStats` is what `hetcache.stats` returns
for all of them; `StepClock` finds the denoising step of a transformer call; `call_argument` reads a forward's
argument by name whether it was passed by position or keyword.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

HOOK_NAME = "hetcache"
DEFAULT_CONTEXT = "default"
# A call's timestep names a scheduler step when it is this close to one of the scheduler's timesteps.
TIMESTEP_RTOL = 1e-3


@dataclass
class CacheStats:
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
    requested_steps: int | None = None  # the steps asked for; `plan` has one letter per solver step that ran
    experts: list[CacheStats] = field(default_factory=list)  # each expert's own, for a two-expert pipeline

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def record(self, branch: str, letter: str, rows: int, first_branch: bool) -> None:
        """Add one finished call's letter (and, for the first branch, its step letter and computed rows)."""
        self.branches[branch] = self.branches.get(branch, "") + letter
        if first_branch:
            self.plan += letter
            self.rows.append(rows)

    def note(self, text: str) -> None:
        """Add a note once."""
        if text not in self.notes:
            self.notes.append(text)

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
            "requested_steps": self.requested_steps,
            "experts": [expert.to_dict() for expert in self.experts],
        }

    @classmethod
    def combine(cls, parts: list[CacheStats]) -> CacheStats:
        """The stats of a two-expert pipeline from each expert's: letters and rows in step order, FLOPs added, the
        larger cache (the first expert's caches are freed when the second starts)."""
        first = parts[0]
        branches: dict[str, str] = {}
        for part in parts:
            for name, letters in part.branches.items():
                branches[name] = branches.get(name, "") + letters
        return cls(plan="".join(p.plan for p in parts), planned=first.planned, delta=first.delta,
                   flops=sum(p.flops for p in parts), dense_flops=sum(p.dense_flops for p in parts),
                   tokens=dict(first.tokens), rows=[r for p in parts for r in p.rows],
                   cache_bytes=max(p.cache_bytes for p in parts), branches=branches,
                   notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
                   requested_steps=first.requested_steps, experts=list(parts))


HetCacheStats = CacheStats
"""The name `CacheStats` had before 0.2; kept for one release."""


class StepClock:
    """The denoising step of a transformer call: the scheduler timestep its timestep matches, else a call count.

    `source` is a scheduler (its `timesteps` are read at each call, so `set_timesteps` after `enable` is seen), a
    tensor of timesteps, or None. Without a match the step is the number of calls the branch made before, modulo
    the plan length when one is known.
    """

    def __init__(self, source: Any = None) -> None:
        self.source = source
        self._host: tuple[torch.Tensor | None, list[float]] = (None, [])

    def timesteps(self) -> torch.Tensor | None:
        if isinstance(self.source, torch.Tensor) or self.source is None:
            return self.source
        return getattr(self.source, "timesteps", None)

    def index(self, timestep: torch.Tensor | float | None, calls: int, period: int | None = None) -> int:
        match = self.match(timestep)
        if match is not None:
            return match
        return calls % period if period else calls

    def match(self, timestep: torch.Tensor | float | None) -> int | None:
        """The index of the scheduler timestep equal (within TIMESTEP_RTOL) to `timestep`, or None."""
        timesteps = self.timesteps()
        if timesteps is None or timestep is None or len(timesteps) == 0:
            return None
        if self._host[0] is not timesteps:  # one host copy per schedule, not one per call
            self._host = (timesteps, timesteps.detach().float().cpu().tolist())
        values = self._host[1]
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        nearest = min(range(len(values)), key=lambda i: abs(values[i] - value))
        return nearest if abs(values[nearest] - value) <= TIMESTEP_RTOL * max(1.0, abs(value)) else None


@functools.cache
def _parameters(function: Callable[..., Any]) -> dict[str, tuple[int, Any]]:
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    return {p.name: (i, p.default) for i, p in enumerate(parameters)}


def call_argument(function: Callable[..., Any], args: tuple, kwargs: dict, name: str) -> Any:
    """Argument `name` of a call of `function` (an unbound forward, e.g. `type(module).forward`), passed by
    position or keyword; its default when it was not passed.

    Positions come from the signature, as diffusers' `TransformerBlockRegistry` metadata reads them (that registry
    knows `WanTransformerBlock` but neither the VACE block nor the transformer), so a diffusers release that
    reorders arguments keeps working.
    """
    if name in kwargs:
        return kwargs[name]
    position, default = _parameters(function)[name]
    if position < len(args):
        return args[position]
    return None if default is inspect.Parameter.empty else default


def parameter_names(function: Callable[..., Any]) -> tuple[str, ...]:
    """The parameter names of `function` (an unbound forward), `self` left out."""
    return tuple(_parameters(function))


def replace_arguments(function: Callable[..., Any], args: tuple, kwargs: dict,
                      values: dict[str, Any]) -> tuple[tuple, dict]:
    """(args, kwargs) of a call of `function` with the arguments named in `values` replaced, each where the call
    passed it (by position or keyword; one it did not pass is added as a keyword)."""
    args, kwargs = list(args), dict(kwargs)
    for name, value in values.items():
        position, _ = _parameters(function)[name]
        if name not in kwargs and position < len(args):
            args[position] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs
