"""CUDA-graph replay of PARTIAL forwards: captured once per (branch, row count), replayed at later PARTIAL steps.

A PARTIAL forward at small r is many small kernels (about 1,000 compiled, 2,300 eager at the 1.3B size), and the
host launching them sets the pace: on the H100 a compiled r = 0.15 step keeps the GPU busy 37 ms of its 41-44
(docs/BENCHMARKS.md). A graph launches them all at once.

A graph reads and writes memory at the addresses it was captured with, so everything a PARTIAL forward touches
must stay where it is between steps:
- the call's tensor arguments and the step's rows: copied into the graph's own buffers before each replay; what
  the engine derives from the rows (the gather, RoPE rows, EMA weights) is computed inside the graph;
- the K/V buffers and the residual: FULL steps write into them in place while graphs are on (`RowUpdate.in_place`);
- the text K/V (per branch and text) and the RoPE tables (per video).
The engine drops its graphs whenever any of those is made anew (a new video, new text).

Graphs are used only where PARTIAL steps are small enough to be host-bound (MAX_ROW_SHARE), on the current CUDA
device, and not under offloading hooks that move weights during the forward. The first PARTIAL call of a key runs
eagerly (it loads kernels, compiled code and attention plans, which capture cannot); the second is captured and
replayed; later ones replay. If a capture fails, graphs stay off for the engine's lifetime: a failed capture can
leave PyTorch's allocator unusable for another one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetcache import compat

# Graphs are used for videos whose PARTIAL steps compute at most this share of the tokens. Above it a PARTIAL step
# is GPU-bound: on the H100 a replay saved 4 ms of 135 at r = 0.415, FULL steps paid 3 ms each for writing K/V in
# place, and a 50-step loop ran 1.6 % slower; at r = 0.15 a replay saves 35 ms of 85 (gpu8.json).
MAX_ROW_SHARE = 0.3


def capturable(transformer: torch.nn.Module, device: torch.device) -> bool:
    """Whether a forward of `transformer` on `device` can be captured: a CUDA device that is the current one
    (capture records that device's streams only), and no offloading hooks (they move weights during the forward)."""
    if device.type != "cuda" or (device.index is not None and device.index != torch.cuda.current_device()):
        return False
    return not any(compat.has_offloading_hooks(module) for module in transformer.modules())


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # the call's flattened arguments; tensors are the graph's static copies
    rows: torch.Tensor
    output: Any


class PartialGraphs:
    """The captured PARTIAL forwards of one video, and whether capturing has failed for good."""

    def __init__(self) -> None:
        self._captured: dict[tuple, CapturedForward] = {}
        self._warm: set[tuple] = set()
        self.failure: str | None = None  # why a capture failed; graphs stay off once it is set

    def clear(self) -> None:
        """Forget every graph: what they read by address is being replaced."""
        self._captured.clear()
        self._warm.clear()

    def __len__(self) -> int:
        return len(self._captured)

    def run(
        self,
        branch: str,
        rows: torch.Tensor,
        args: tuple,
        kwargs: dict,
        forward: Callable[..., Any],
        use_inputs: Callable[[torch.Tensor, tuple, dict], None],
    ) -> Any:
        """forward(*args, **kwargs) for a PARTIAL step computing `rows`, replayed from a graph where one exists.

        `use_inputs(rows, args, kwargs)` makes the engine derive everything that depends on the rows or the call's
        arguments (the timestep) from the graph's own buffers.
        """
        flat, spec = pytree.tree_flatten((args, kwargs))
        key = (branch, int(rows.numel()), str(spec), *(_signature(value) for value in flat))
        captured = self._captured.get(key)
        if captured is None:
            if self.failure is not None or key not in self._warm:
                self._warm.add(key)
                return forward(*args, **kwargs)
            captured = self._capture(key, flat, spec, rows, forward, use_inputs)
            if captured is None:
                return forward(*args, **kwargs)
        else:
            for static, value in zip(captured.inputs, flat):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
            captured.rows.copy_(rows)
        captured.graph.replay()
        return pytree.tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value,
                               captured.output)

    def _capture(self, key: tuple, flat: list, spec: pytree.TreeSpec, rows: torch.Tensor,
                 forward: Callable[..., Any],
                 use_inputs: Callable[[torch.Tensor, tuple, dict], None]) -> CapturedForward | None:
        inputs = [value.clone() if isinstance(value, torch.Tensor) else value for value in flat]
        static_rows = rows.clone()
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=rows.device)
        try:
            with torch.cuda.stream(stream):  # the caller's stream comes back however the capture ends
                with torch.cuda.graph(graph, stream=stream):
                    use_inputs(static_rows, args, kwargs)  # inside: what derives from them is recomputed at replay
                    output = forward(*args, **kwargs)
        except Exception as error:
            self.failure = f"{type(error).__name__}: {error}"
            if error.__context__ is not None:  # capture_end's own error hides the one that spoilt the capture
                self.failure += f" (after {type(error.__context__).__name__}: {error.__context__})"
            self.failure = self.failure[:400]
            self.clear()
            use_inputs(rows, *pytree.tree_unflatten(flat, spec))
            return None
        captured = CapturedForward(graph, inputs, static_rows, output)
        self._captured[key] = captured
        return captured


def _signature(value: Any) -> Any:
    """What a replay must match: shape, dtype and device of tensors; the value of anything else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return ("value", repr(value))
