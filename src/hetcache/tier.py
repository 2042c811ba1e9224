"""The host tier of the cache store: K/V of some layers kept in (pinned) host memory, moved beside the compute.

At 81 frames the K/V of every layer take as much memory as the rest of the run together (docs/ENGINE.md), while a
layer's K/V cross the host link in a fraction of the time the layer computes. So a layer kept on the host is
brought to the GPU just before it runs and sent back after, on two side streams, and the compute stream never
waits for a copy that could have started earlier:

- a PARTIAL step fetches layer k+1's K/V (the next host layer in execution order) into a second working buffer
  while layer k computes (double buffering: two working buffers, whatever the number of layers);
- after a layer's self-attention, its working buffer (with the fresh rows written in) goes back to the host on
  the other stream; the buffer is reused only once that copy is done;
- a FULL step fetches nothing (it computes every row) and writes back every layer it computed.

`Transfers` does the copying: `CudaTransfers` on streams and events; `InlineTransfers` at once, for the CPU,
where it also records what happened in which order (the tests check the schedule with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

LayerKey = tuple[str, int]  # ("vace" | "main", layer)


class InlineTransfers:
    """Copies done at once on the calling thread; `log` records ("fetch" | "write_back", layer) in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, LayerKey]] = []

    def copy(self, destination: Sequence[torch.Tensor], source: Sequence[torch.Tensor], kind: str,
             layer: LayerKey, after: Sequence[Any] = ()) -> None:
        for dst, src in zip(destination, source):
            dst.copy_(src)
        self.log.append((kind, layer))

    def mark(self) -> None:
        return None

    def wait(self, event: Any) -> None:
        pass


class CudaTransfers:
    """Copies on two side streams (host to device, device to host), ordered by events."""

    def __init__(self, device: torch.device) -> None:
        self.fetch_stream = torch.cuda.Stream(device)
        self.write_stream = torch.cuda.Stream(device)
        self.log: list[tuple[str, LayerKey]] = []

    def copy(self, destination: Sequence[torch.Tensor], source: Sequence[torch.Tensor], kind: str,
             layer: LayerKey, after: Sequence[Any] = ()) -> torch.cuda.Event:
        stream = self.fetch_stream if kind == "fetch" else self.write_stream
        with torch.cuda.stream(stream):
            for event in after:
                if event is not None:
                    stream.wait_event(event)
            for dst, src in zip(destination, source):
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def mark(self) -> torch.cuda.Event:
        """An event at the current point of the compute stream."""
        event = torch.cuda.Event()
        event.record()
        return event

    def wait(self, event: Any) -> None:
        """The compute stream waits for `event` (the host does not)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


class HostTier:
    """Working buffers on the device for the layers whose K/V live on the host, and the copies between them."""

    def __init__(self, order: Sequence[LayerKey], on_host: set[LayerKey], transfers: Any,
                 device: torch.device) -> None:
        self.order = [key for key in order if key in on_host]  # host layers in execution order
        self.on_host = on_host
        self.transfers = transfers
        self.device = device
        self.pool: list[list[torch.Tensor] | None] = [None, None]  # two working buffer sets
        self.done: list[Any] = [None, None]  # per slot: the write-back that must finish before reuse
        self.staged: dict[tuple[int, LayerKey], tuple[int, Any]] = {}  # prefetched layers: slot, fetch event
        self.in_use: dict[int, LayerKey] = {}

    def _slot(self, like: Sequence[torch.Tensor]) -> int:
        staged = {slot for slot, _ in self.staged.values()}
        slot = next(i for i in range(len(self.pool)) if i not in self.in_use and i not in staged)
        buffers = self.pool[slot]
        if buffers is None or [b.shape for b in buffers] != [t.shape for t in like] or buffers[0].dtype != like[0].dtype:
            self.pool[slot] = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in like]
        return slot

    def acquire(self, branch: int, key: LayerKey, storage: Sequence[torch.Tensor],
                fetch: bool) -> tuple[int, list[torch.Tensor]]:
        """(slot, working buffers) of a host layer about to run; with `fetch` they hold its stored K/V (the
        compute stream waits for them)."""
        staged = self.staged.pop((branch, key), None)
        if staged is not None:
            slot, ready = staged
        else:
            slot = self._slot(storage)
            ready = self.transfers.copy(self.pool[slot], storage, "fetch", key, after=[self.done[slot]]) \
                if fetch else None
        if not fetch:  # the step computes every row: nothing to read, but the last write-back must be done
            self.transfers.wait(self.done[slot])
        self.transfers.wait(ready)
        self.in_use[slot] = key
        return slot, self.pool[slot]

    def prefetch(self, branch: int, key: LayerKey, storage: Sequence[torch.Tensor]) -> None:
        """Start fetching host layer `key` into a free working buffer."""
        if (branch, key) in self.staged or len(self.in_use) + len(self.staged) >= len(self.pool):
            return
        slot = self._slot(storage)
        event = self.transfers.copy(self.pool[slot], storage, "fetch", key, after=[self.done[slot]])
        self.staged[(branch, key)] = (slot, event)

    def next_layer(self, key: LayerKey) -> LayerKey | None:
        """The host layer that runs after `key` in the same call, if any."""
        position = self.order.index(key)
        return self.order[position + 1] if position + 1 < len(self.order) else None

    def release(self, slot: int, key: LayerKey, storage: Sequence[torch.Tensor]) -> None:
        """The layer has run: send its working buffers back to the host once the compute stream gets here."""
        self.done[slot] = self.transfers.copy(storage, self.pool[slot], "write_back", key,
                                              after=[self.transfers.mark()])
        del self.in_use[slot]

    def nbytes(self) -> int:
        """Bytes of the device working buffers."""
        return sum(t.numel() * t.element_size() for buffers in self.pool if buffers for t in buffers)


def spread(order: Sequence[LayerKey], count: int) -> set[LayerKey]:
    """`count` of the layers in `order`, spread evenly, so each host layer's fetch hides behind the compute of the
    layers before it."""
    if count <= 0:
        return set()
    count = min(count, len(order))
    return {order[(2 * j + 1) * len(order) // (2 * count)] for j in range(count)}
