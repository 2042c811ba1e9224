"""The cache store: the one place that owns what HetCache keeps between steps, per CFG branch.

Per branch (`BranchCache`): each main and VACE layer's self-attention K (after norm and RoPE) and V of every token
(`LayerKV`), the text K/V of each cross-attention (step-invariant, made once per text), and the residual
R = h_out - h_in of the whole block stack.

What the maths reads is never rounded: a FULL step attends to the K/V it just computed, a PARTIAL step to its
fresh rows plus the stored rows of the others in the compute dtype; only the stored copies take `cache_dtype`
(the residual keeps the model's compute dtype). With `reuse="hold"` the stored value of a row is its last computed one;
with "linear" / "quadratic" the store keeps a row's last two / three samples and their timesteps, and what is
read for rows not computed now is their extrapolation to this step's timestep (`forecast.py`).

In place mode (CUDA graphs, which read buffers by address) allocates every buffer once per video and only ever
writes into it.

Under Ulysses context parallelism over P ranks (`hetcache.shard`) a rank's K/V buffers hold every token for its
H / P heads ([B, N, H / P, head_dim], `head_shards` = P) and its residual holds its token chunk ([B, N / P, dim]);
the text K/V stay whole, and the sample times cover every token (the K/V forecasts read them all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcache.forecast import ORDERS, RowHistory, SampleTimes
from hetcache.sparse import text_key_value
from hetcache.tier import HostTier


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def blend_rows(buffer: torch.Tensor, index: torch.Tensor, fresh: torch.Tensor, blend: torch.Tensor | None,
               old: torch.Tensor | None = None) -> None:
    """buffer[:, index] = fresh, or blend * old + (1 - blend) * fresh per row when `blend` is given.

    `old` defaults to the rows currently in the buffer.
    """
    fresh = ema(fresh, buffer.index_select(1, index) if old is None and blend is not None else old, blend)
    fresh = fresh.to(buffer.dtype)
    if buffer.element_size() == 1:  # float8 caches: index_copy_ has no float8 kernels, bytes move the same
        buffer.view(torch.uint8).index_copy_(1, index, fresh.view(torch.uint8))
    else:
        buffer.index_copy_(1, index, fresh)


def ema(fresh: torch.Tensor, old: torch.Tensor | None, blend: torch.Tensor | None) -> torch.Tensor:
    """blend * old + (1 - blend) * fresh per row (float32), or `fresh` itself without `blend`."""
    if blend is None:
        return fresh
    weight = blend.view(1, -1, *([1] * (fresh.dim() - 2))).float()
    return torch.lerp(fresh.float(), old.float(), weight)


@dataclass
class RowUpdate:
    """What a call computes and how its rows reach the caches; read by every block of the call."""

    index: torch.Tensor | None  # sorted token indices of the rows; None = all tokens (a FULL step)
    blend: torch.Tensor | None = None  # [n] float weight of the OLD value per row (EMA); None = replace
    cache_dtype: torch.dtype | None = None
    in_place: bool = False  # FULL steps write into the existing buffers (CUDA graphs read them by address)
    weights: torch.Tensor | None = None  # forecast weights [slots, N] at this step (None: hold)


class LayerKV:
    """Self-attention keys and values of every token for one layer and one CFG branch: [B, N, heads, head_dim].

    `exchange` gives attention what it reads and stores the fresh rows; `settle` finishes the store after
    attention (EMA blends, and rows that attention must still read fresh).
    """

    def __init__(self, fixed: bool = False) -> None:
        self.key: torch.Tensor | None = None  # hold: the stored K/V
        self.value: torch.Tensor | None = None
        self.history: tuple[RowHistory, RowHistory] | None = None  # forecast: the last samples of K and V
        self.fixed = fixed  # the buffers stay where they are: FULL steps write into them
        self.slot = -1  # the host tier's working buffer set this view uses
        self._old: tuple[torch.Tensor, torch.Tensor] | None = None

    def nbytes(self) -> int:
        return sum(_bytes(t) for t in self.buffers())

    def buffers(self) -> list[torch.Tensor]:
        """The stored tensors ([K, V], or their sample histories), empty before allocation."""
        if self.history is not None:
            return [h.values for h in self.history]
        return [t for t in (self.key, self.value) if t is not None]

    def working(self, buffers: list[torch.Tensor], slot: int) -> LayerKV:
        """A view of the same kind over other buffers (the host tier's device copies), written in place."""
        view = LayerKV(fixed=True)
        view.slot = slot
        if self.history is not None:
            view.history = tuple(RowHistory(0, b[0], b.dtype, values=b) for b in buffers)
        else:
            view.key, view.value = buffers
        return view

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slots: int,
                 pin: bool = False) -> None:
        """Buffers of `shape` [B, N, heads, head_dim] (kept when they already fit); `pin` for host memory that
        copies to the GPU asynchronously."""
        current = self.buffers()
        wanted = (slots, *shape) if slots else shape
        if current and current[0].shape == wanted and current[0].dtype == dtype:
            return
        make = [torch.zeros(wanted, dtype=dtype, device=device, pin_memory=pin) for _ in range(2)]
        if slots:
            self.history = tuple(RowHistory(0, b[0], dtype, values=b) for b in make)
        else:
            self.key, self.value = make

    def _aliased(self, key: torch.Tensor) -> bool:
        """Attention reads the stored buffer itself (hold, stored in the compute dtype)."""
        return self.history is None and self.key.dtype == key.dtype

    def exchange(self, key: torch.Tensor, value: torch.Tensor, update: RowUpdate) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V attention reads for fresh rows `key`, `value` ([B, n, heads, head_dim]): every token, the fresh
        rows at full precision. Stores the fresh rows (or leaves that to `settle`)."""
        index, dtype = update.index, update.cache_dtype or key.dtype
        if index is None:  # FULL: attention reads what was just computed
            if self.history is not None:
                self.history[0].push(None, key)
                self.history[1].push(None, value)
            elif update.in_place or self.fixed:
                self.key.copy_(key)
                self.value.copy_(value)
            else:  # no copy when the cache dtype is the compute dtype
                self.key, self.value = key.to(dtype), value.to(dtype)
            return key, value
        if self.history is not None:
            keys = self.history[0].forecast(update.weights, key.dtype)
            values = self.history[1].forecast(update.weights, key.dtype)
            old = (self.history[0].latest().index_select(1, index), self.history[1].latest().index_select(1, index))
        else:
            old = (self.key.index_select(1, index), self.value.index_select(1, index))
            if self._aliased(key):
                self._old = old if update.blend is not None else None
                blend_rows(self.key, index, key, None)
                blend_rows(self.value, index, value, None)
                return self.key, self.value
            keys, values = self.key.to(key.dtype), self.value.to(key.dtype)
        self._old = old
        keys.index_copy_(1, index, key)
        values.index_copy_(1, index, value)
        return keys, values

    def settle(self, key: torch.Tensor, value: torch.Tensor, update: RowUpdate) -> None:
        """After attention: store the rows of a PARTIAL step that `exchange` left (EMA-blended when asked)."""
        index, old = update.index, self._old
        self._old = None
        if index is None or (old is None and self._aliased(key)):
            return
        if self.history is not None:
            self.history[0].push(index, ema(key, old[0], update.blend))
            self.history[1].push(index, ema(value, old[1], update.blend))
            return
        blend_rows(self.key, index, key, update.blend, old[0])
        blend_rows(self.value, index, value, update.blend, old[1])


class BranchCache:
    """The buffers of one CFG branch."""

    def __init__(self, name: str = "") -> None:
        self.name = name  # the CFG branch (`cache_context` name)
        self.kv: dict[tuple[str, int], LayerKV] = {}  # ("main" | "vace", layer) -> K/V of every token
        self.text_kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.text_source: torch.Tensor | None = None  # the text the text K/V were made from
        self.residual: torch.Tensor | None = None  # hold: [1, N, dim]
        self.residual_history: RowHistory | None = None  # forecast: its last samples
        self.times: SampleTimes | None = None  # forecast: when each row's samples were computed

    def layer(self, kind: str, layer: int) -> LayerKV:
        """The K/V of main (`kind` "main") or VACE ("vace") layer `layer` (empty before the first FULL step)."""
        return self.kv.setdefault((kind, layer), LayerKV())

    @property
    def ready(self) -> bool:
        """Whether a FULL step has filled the caches (REUSE and PARTIAL need them)."""
        return self.residual is not None or self.residual_history is not None

    def text_nbytes(self) -> int:
        """Bytes of the text K/V."""
        return sum(_bytes(k) + _bytes(v) for k, v in self.text_kv.values())

    def nbytes(self) -> int:
        total = sum(kv.nbytes() for kv in self.kv.values()) + self.text_nbytes()
        history = 0 if self.residual_history is None else self.residual_history.nbytes()
        return total + _bytes(self.residual) + history


class CacheStore:
    """Allocation, dtype, forecast order and place (device or host tier) of every branch's buffers."""

    def __init__(self, cache_dtype: torch.dtype | None, heads: int, reuse: str = "hold", head_shards: int = 1) -> None:
        self.cache_dtype = cache_dtype
        self.heads = heads
        self.head_shards = head_shards  # the K/V keep heads / head_shards heads (context parallelism)
        self.slots = ORDERS[reuse] + 1 if reuse != "hold" else 0  # samples kept per row (0: hold)
        self.host: HostTier | None = None  # the layers whose K/V live in host memory, and their copies
        # Host storage by (branch, kind, layer), kept from one video to the next: pinning tens of GB takes seconds.
        self.host_kv: dict[tuple[str, str, int], LayerKV] = {}

    def use_host(self, tier: HostTier | None) -> None:
        """Keep the K/V of `tier.on_host` layers in host memory from the next video on (None: every layer on the
        device)."""
        self.host = tier

    def layer_kv(self, cache: BranchCache, kind: str, layer: int, hidden: torch.Tensor, num_tokens: int,
                 in_place: bool, computes_all: bool) -> LayerKV:
        """The K/V the layer's block works with. In place mode allocates them here, once per video, so the block
        maths always writes into existing tensors (and compiled code sees one kind of argument). A host layer's
        are device working buffers, fetched from the host unless this call computes every row (`computes_all`)
        and keeps no samples, with the next host layer's fetch started behind them; `release` sends them back."""
        kv = cache.layer(kind, layer)
        shape = (hidden.shape[0], num_tokens, self.heads // self.head_shards, hidden.shape[-1] // self.heads)
        dtype = self.cache_dtype or hidden.dtype
        host = self.host
        if host is None or (kind, layer) not in host.on_host:
            if in_place or self.slots:
                kv.allocate(shape, dtype, hidden.device, self.slots)
            return kv
        kv = cache.kv[(kind, layer)] = self.host_kv.setdefault((cache.name, kind, layer), kv)
        kv.allocate(shape, dtype, torch.device("cpu"), self.slots, pin=hidden.device.type == "cuda")
        fetch = not computes_all or bool(self.slots)
        slot, buffers = host.acquire(id(cache), (kind, layer), kv.buffers(), fetch)
        if fetch:
            following = host.next_layer((kind, layer))
            if following is not None and cache.layer(*following).buffers():
                host.prefetch(id(cache), following, cache.layer(*following).buffers())
        return kv.working(buffers, slot)

    def release(self, cache: BranchCache, kind: str, layer: int, kv: LayerKV) -> None:
        """The layer's block has run: a host layer's working buffers go back to the host."""
        if kv.slot >= 0:
            self.host.release(kv.slot, (kind, layer), cache.layer(kind, layer).buffers())

    def text_kv(self, cache: BranchCache, kind: str, layer: int, attn: torch.nn.Module,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention K/V of `text` for one layer, made at the layer's first use (at every use with the host
        tier, which keeps the GPU for what it cannot recompute: by the cost model they are 0.05 % of a FULL step and
        0.2 % of a PARTIAL step at r = 0.3 at 81 frames of 480p on the 1.3B model)."""
        if self.host is not None:
            return text_key_value(attn, text)
        if (kind, layer) not in cache.text_kv:
            cache.text_kv[(kind, layer)] = text_key_value(attn, text)
        return cache.text_kv[(kind, layer)]

    def use_text(self, cache: BranchCache, text: torch.Tensor) -> bool:
        """Make `text` the branch's text; True when it replaced another one (its text K/V are dropped)."""
        if cache.text_source is text:
            return False
        cache.text_kv.clear()
        cache.text_source = text
        return True

    # ---------------------------------------------------------------------------------------------- forecast
    def forecast_weights(self, cache: BranchCache, time: torch.Tensor) -> torch.Tensor | None:
        """Per-row weights that extrapolate the stored samples to `time` (None with hold or before any sample)."""
        if not self.slots or cache.times is None:
            return None
        return cache.times.weights(time)

    def _record_time(self, cache: BranchCache, rows: torch.Tensor | None, time: torch.Tensor,
                     num_rows: int, device: torch.device) -> None:
        if cache.times is None:
            cache.times = SampleTimes(self.slots, num_rows, device)
        cache.times.push(rows, time)

    # ---------------------------------------------------------------------------------------------- residual
    def residual(self, cache: BranchCache, weights: torch.Tensor | None) -> torch.Tensor:
        """R of every token for this step: the stored one, or its forecast with `weights`."""
        if cache.residual_history is None:
            return cache.residual
        return cache.residual_history.forecast(weights, torch.float32)

    def keep_residual(self, cache: BranchCache, residual: torch.Tensor, dtype: torch.dtype, time: torch.Tensor,
                      in_place: bool, num_tokens: int | None = None) -> None:
        """Store a FULL step's residual of every token in `dtype` (the compute dtype: never `cache_dtype`), computed
        at `time`. `num_tokens`: the tokens whose sample times are kept, when the residual has a chunk of them."""
        if self.slots:
            if cache.residual_history is None or cache.residual_history.values.shape[1:] != residual.shape:
                cache.residual_history = RowHistory(self.slots, residual, dtype)
            cache.residual_history.push(None, residual)
            self._record_time(cache, None, time, num_tokens or residual.shape[1], residual.device)
            return
        kept = cache.residual
        if in_place and kept is not None and kept.shape == residual.shape and kept.dtype == dtype:
            kept.copy_(residual)
        else:
            cache.residual = residual.to(dtype)

    def update_residual_rows(self, cache: BranchCache, rows: torch.Tensor, fresh: torch.Tensor,
                             blend: torch.Tensor | None, time: torch.Tensor, computed: torch.Tensor | None = None) -> None:
        """Refresh the residual of the rows a PARTIAL step computed (blended with EMA weights when given).
        `computed`: every token the step computed, when the residual holds a chunk of the tokens (`rows` are then
        positions in the chunk); their sample times advance (the K/V forecasts of all of them read the times)."""
        if cache.residual_history is None:
            blend_rows(cache.residual, rows, fresh, blend)
            return
        old = cache.residual_history.latest().index_select(1, rows)
        cache.residual_history.push(rows, ema(fresh, old, blend))
        cache.times.push(rows if computed is None else computed, time)
