"""What one rank of a context-parallel transformer receives from the others, per step kind (F, P, R).

Counted where the data moves, from the sizes of the tensors the collectives carry: the Ulysses all-to-alls of
every self-attention (diffusers' own, in a stock block: 4 per layer, each moving the layer's Q, K, V or output of
this rank's rows; or HetCache's, with the rows it computes), the gathers and exchanges of the HetCache engine, and
the output gather of `proj_out`. A rank receives (P - 1) / P of an even all-to-all's buffer, P - 1 shards of an
all-gather, all of a broadcast it does not send. The last call of each kind keeps its list of collectives, so a
benchmark can replay them alone and time the communication (`benchmarks/gpu_parallel.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

KINDS = "FPR"


@dataclass(frozen=True)
class Collective:
    """One collective as this rank took part in it: which, how many values it put in, their dtype, and the bytes
    it received."""

    op: str  # "all_to_all" | "all_gather" | "gather" | "broadcast"
    numel: int  # values this rank put in (an all-gather's shard, an all-to-all's whole input)
    dtype: torch.dtype
    received: int  # bytes from the other ranks


class CommLedger:
    """Bytes received per step kind over this rank's transformer calls, and the peak cache bytes the HetCache
    engine reported."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.calls: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.last: dict[str, list[Collective]] = {}  # the collectives of the last call of each kind
        self.cache_bytes = 0  # peak bytes of the HetCache caches on this rank
        self.text_kv_bytes = 0  # of which text K/V (kept whole on every rank)
        self._kind: str | None = None  # the open call's kind
        self._current: list[Collective] = []

    # ------------------------------------------------------------------------------------------------ calls
    def open_call(self, kind: str) -> bool:
        """Start counting a call of `kind`; False (and nothing changes) when a call is already open: the HetCache
        engine opens its calls before the transformer's own context-parallel hook sees them."""
        if self._kind is not None:
            return False
        self._kind, self._current = kind, []
        return True

    def close_call(self) -> None:
        if self._kind is None:
            return
        self.calls[self._kind] += 1
        self.received[self._kind] += sum(c.received for c in self._current)
        self.last[self._kind] = self._current
        self._kind, self._current = None, []

    def reset(self) -> None:
        """Forget every count, the cache peak and the last calls (a benchmark does this after its warm-up)."""
        if self._kind is not None:
            raise RuntimeError("a transformer call is being counted: reset between calls")
        self.calls.clear()
        self.received.clear()
        self.last = {}
        self.cache_bytes = self.text_kv_bytes = 0

    def per_call(self) -> dict[str, int]:
        """Mean bytes received per call, by step kind (kinds that ran)."""
        return {kind: round(self.received[kind] / self.calls[kind]) for kind in KINDS if self.calls[kind]}

    # ----------------------------------------------------------------------------------------- collectives
    def _add(self, op: str, tensor_or_numel: torch.Tensor | int, dtype: torch.dtype | None, received: float) -> None:
        if isinstance(tensor_or_numel, torch.Tensor):
            numel, dtype = tensor_or_numel.numel(), tensor_or_numel.dtype
        else:
            numel = tensor_or_numel
        self._current.append(Collective(op, numel, dtype, round(received)))

    def all_to_all(self, tensor: torch.Tensor) -> None:
        """An even all-to-all of `tensor` (this rank's input)."""
        size = tensor.numel() * tensor.element_size()
        self._add("all_to_all", tensor, None, size * (self.degree - 1) / self.degree)

    def uneven_all_to_all(self, sent: torch.Tensor, received_numel: int, kept_numel: int) -> None:
        """An all-to-all with split sizes: `sent` the whole input, `kept_numel` of the `received_numel` values
        that arrive come from this rank itself."""
        self._add("all_to_all", sent, None, (received_numel - kept_numel) * sent.element_size())

    def all_gather(self, shard: torch.Tensor) -> None:
        """An all-gather of `shard` (this rank's part)."""
        self._add("all_gather", shard, None, shard.numel() * shard.element_size() * (self.degree - 1))

    def gather(self, shard: torch.Tensor, root: bool) -> None:
        """A gather of `shard` to one rank (`root`: this one)."""
        received = shard.numel() * shard.element_size() * (self.degree - 1) if root else 0
        self._add("gather", shard, None, received)

    def broadcast(self, tensor: torch.Tensor, root: bool) -> None:
        """A broadcast of `tensor` from one rank (`root`: this one)."""
        self._add("broadcast", tensor, None, 0 if root else tensor.numel() * tensor.element_size())

    def stock_attention(self, rows: int, dim: int, dtype: torch.dtype) -> None:
        """diffusers' Ulysses self-attention of `rows` tokens of width `dim`: Q, K, V to head shards, the output
        back (four even all-to-alls)."""
        like = torch.empty((), dtype=dtype)
        for _ in range(4):
            self._add("all_to_all", rows * dim, dtype, rows * dim * like.element_size() * (self.degree - 1) / self.degree)

    # ---------------------------------------------------------------------------------------------- report
    def figures(self) -> list[int]:
        """This rank's totals as integers (`summary` reads them): cache bytes, text K/V bytes, then calls and bytes
        received of each kind in `KINDS` order. A fixed-length list, so that one all-gather brings every rank's."""
        return [self.cache_bytes, self.text_kv_bytes, *(self.calls[k] for k in KINDS),
                *(self.received[k] for k in KINDS)]


def summary(degree: int, ranks: list[list[int]]) -> list[str]:
    """The summary lines of a context-parallel run from every rank's `CommLedger.figures`: what one process would
    hold, then per rank its cache bytes and the bytes it received per call of each step kind."""
    cache, text = ranks[0][0], ranks[0][1]
    head = f"{degree} processes (Ulysses)"
    if cache:
        whole = (cache - text) * degree + text
        head += (f"; HetCache cache in one process {_size(whole)}, of which text K/V {_size(text)} "
                 "(kept whole on every rank, the rest split)")
    lines = [head]
    for rank, values in enumerate(ranks):
        calls = dict(zip(KINDS, values[2:5]))
        received = dict(zip(KINDS, values[5:8]))
        per_call = ", ".join(f"{kind} {_size(received[kind] / calls[kind])} ({calls[kind]} calls)"
                             for kind in KINDS if calls[kind])
        line = f"rank {rank}: received per call {per_call or '- (no calls)'}"
        if values[0]:
            line += f"; HetCache cache {_size(values[0])}"
        lines.append(line)
    return lines


def _size(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
