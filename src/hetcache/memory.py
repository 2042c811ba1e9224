"""How many bytes HetCache's caches take for a model, a video size and a config, and whether they fit.

The K/V of every main and VACE layer dominate: 2 x layers x N x dim x bytes per CFG branch (and per forecast
sample). The residual and the text K/V are small beside them. `estimate_memory` gives the figure before anything
is loaded (from the model config alone); `fit` decides where the cache can live, so a command can stop with a
clear message before denoising instead of running out of memory in the middle of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hetcache import flops, tokens
from hetcache.config import HetCacheConfig
from hetcache.errors import UserError
from hetcache.forecast import ORDERS
from hetcache.tier import CudaTransfers, HostTier, InlineTransfers, spread

# Free memory kept aside when deciding that a cache fits: activations of the widest layer, allocator slack.
FIT_MARGIN = 0.10
_GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the caches of one video, all CFG branches together."""

    kv_bytes: int  # self-attention K/V of every main and VACE layer, every sample kept
    residual_bytes: int  # the block-stack residual, every sample kept
    text_kv_bytes: int  # cross-attention K/V of the text
    times_bytes: int  # forecast sample times
    tokens: int
    layers: int
    activation_bytes: int = 0  # what a FULL forward holds at its peak besides weights and caches (not a cache)
    shards: int = 1  # context-parallel processes: the figures are one process's

    @property
    def total(self) -> int:
        return self.kv_bytes + self.residual_bytes + self.text_kv_bytes + self.times_bytes

    def describe(self) -> str:
        share = f", per process of {self.shards}" if self.shards > 1 else ""
        return (f"cache {self.total / _GIB:.2f} GiB ({self.kv_bytes / _GIB:.2f} GiB K/V of {self.layers} layers x "
                f"{self.tokens:,} tokens{share})")


def estimate_memory(model: Any, frames: int, height: int, width: int, config: HetCacheConfig | None = None, *,
                    dtype: torch.dtype = torch.bfloat16, text_len: int = 512, branches: int = 2,
                    reference_frames: int = 0, shards: int = 1) -> MemoryEstimate:
    """The cache bytes of `config` for a video of `frames` x `height` x `width` pixels on `model` (a transformer,
    its config, or a config dict) in compute dtype `dtype`, with `branches` CFG branches (2 with guidance), on one
    of `shards` context-parallel processes (`cache_bytes`).

    Plans that can have PARTIAL steps keep every layer's K/V; others (TeaCache-like: `kappa` 1 and `refresh_every`
    1, or a fixed plan without P) keep only the residual.
    """
    source = model.config if hasattr(model, "config") and not isinstance(model, Mapping) else model
    shape = flops.ModelShape.from_config(source)
    grid = tokens.latent_grid((frames, height, width), shape.patch_size)
    num_tokens = (grid[0] + reference_frames) * grid[1] * grid[2]
    return cache_bytes(shape, num_tokens, config or HetCacheConfig(), dtype=dtype, text_len=text_len,
                       branches=branches, shards=shards)


def cache_bytes(shape: flops.ModelShape, num_tokens: int, config: HetCacheConfig, *, dtype: torch.dtype,
                text_len: int, branches: int = 2, shards: int = 1) -> MemoryEstimate:
    """`estimate_memory` for a video of `num_tokens` tokens; `shards`: the context-parallel degree, whose ranks
    each keep 1 / shards of the K/V (their heads) and of the residual (their token chunk), and the whole text
    K/V; a rank's blocks run on 1 / shards of the rows."""
    n, layers = num_tokens, shape.num_layers + shape.num_vace_layers
    slots = ORDERS[config.reuse] + 1
    compute = torch.empty((), dtype=dtype).element_size()
    stored = torch.empty((), dtype=config.cache_dtype or dtype).element_size()
    partial = "P" in config.plan if config.plan else not (config.kappa == 1.0 and config.refresh_every == 1)
    return MemoryEstimate(
        kv_bytes=2 * layers * n * shape.dim * stored * slots * branches // shards if partial else 0,
        residual_bytes=n * shape.dim * compute * slots * branches // shards,
        text_kv_bytes=2 * layers * text_len * shape.dim * compute * branches if partial else 0,
        times_bytes=slots * n * 8 * branches if slots > 1 else 0,
        tokens=n,
        layers=layers,
        activation_bytes=activation_bytes(shape, n // shards, compute),
        shards=shards,
    )


def activation_bytes(shape: flops.ModelShape, num_tokens: int, element_size: int) -> int:
    """About what a FULL forward holds at its peak besides weights and caches: the VACE hints (one [N, dim] per
    VACE layer, kept until the main block that adds them), a few [N, dim] tensors of the current block (hidden
    states, its float32 norms, Q, K, V, attention output) and the FFN's two [N, ffn] tensors."""
    per_row = (shape.num_vace_layers + 4) * shape.dim * element_size + 4 * shape.dim * 4
    return num_tokens * (per_row + 2 * shape.ffn_dim * element_size)


def host_available_bytes() -> int:
    """Memory the host can still give (MemAvailable), or 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def device_available_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (the caching allocator's reserve counts as free, a per-process cap set with
    `torch.cuda.set_per_process_memory_fraction` is respected), or the host's for the CPU."""
    if device.type != "cuda":
        return host_available_bytes()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = torch.cuda.get_per_process_memory_fraction(index)  # a cap the process set on itself
    return max(0, min(available, int(fraction * total) - allocated))


def fit(estimate: MemoryEstimate, device: torch.device, cache_device: str, *, device_free: int | None = None,
        host_free: int | None = None) -> tuple[str, str]:
    """Where the cache goes ("device" or "host") for `cache_device` ("auto", "cuda" or "cpu"), and why.

    "auto" keeps it on `device` when it fits there with FIT_MARGIN to spare, else on the host. Raises UserError,
    naming the ways out, when the chosen (or, with auto, either) place cannot hold it.
    """
    on_gpu = device.type == "cuda"
    device_free = device_available_bytes(device) if device_free is None else device_free
    host_free = host_available_bytes() if host_free is None else host_free
    need = math.ceil(estimate.total * (1 + FIT_MARGIN))
    fits_device = need + estimate.activation_bytes <= device_free  # the forward's own peak shares the device
    fits_host = need <= host_free
    where = f"{estimate.describe()}; free: {device_free / _GIB:.1f} GiB on {device}"
    if on_gpu:
        where += f", {host_free / _GIB:.1f} GiB on the host"
    if not on_gpu or cache_device == "cuda":
        if fits_device:
            return "device", where
        raise UserError(f"the cache does not fit: {where}: {_ways_out(on_gpu and cache_device == 'cuda')}")
    if cache_device == "cpu" or not fits_device:
        if fits_host:
            return "host", where
        raise UserError(f"the cache fits neither on the GPU nor on the host: {where}: {_ways_out(False)}")
    return "device", where


def _ways_out(suggest_host: bool) -> str:
    ways = ["--cache-device cpu"] if suggest_host else []
    ways += ["--cache-dtype float8_e4m3fn", "fewer --frames", "a smaller --height/--width"]
    return "try " + ", ".join(ways)


def place_cache(transformer: torch.nn.Module, config: HetCacheConfig, num_tokens: int, text_len: int,
                device: torch.device, shards: int = 1) -> tuple[HostTier | None, str]:
    """The host tier for a video of `num_tokens` tokens (None: every layer's K/V on `device`) and a note saying
    where the cache went and why (`shards`: the context-parallel degree). Raises UserError when the cache fits
    nowhere."""
    shape = flops.ModelShape.from_config(transformer.config)
    estimate = cache_bytes(shape, num_tokens, config, dtype=transformer.dtype, text_len=text_len, shards=shards)
    if device.type == "cuda":
        where, why = fit(estimate, device, config.cache_device)
        if where == "device":
            return None, f"cache on {device}: {why}"
        transfers = CudaTransfers(device)
    elif config.cache_device == "cpu":  # the host is the device: the tier runs with copies done at once
        why, transfers = estimate.describe(), InlineTransfers()
    else:
        return None, ""
    order = [("vace", i) for i in range(shape.num_vace_layers)] + [("main", i) for i in range(shape.num_layers)]
    on_host = spread(order, math.ceil(config.host_share * len(order)))
    note = f"cache on the host: K/V of {len(on_host)} of {len(order)} layers; {why}"
    return HostTier(order, on_host, transfers, device), note
