"""Self-attention of PARTIAL steps alone: q of n selected rows against all N keys, per attention backend.

A PARTIAL step's attention runs n query rows against N = 14,040 keys (Wan2.1-VACE-1.3B, 480x832, 33 frames;
12 heads of 128). At small n a flash kernel's grid (query tiles x heads) can leave the last wave of the GPU's
multiprocessors half empty. This times each available backend of diffusers' dispatcher at several n and prints
the time per query row relative to n = N, so the effect (and a backend that avoids it) shows directly.

It also times split-KV attention ("split-S"): the keys are cut into S chunks that run as S batch entries of one
flash call (S times the thread blocks, each over N/S keys), and the chunk outputs are merged with their
log-sum-exps. If the small-n penalty is the grid leaving multiprocessors idle, split-KV removes most of it.

    python benchmarks/attention_backends.py --out attention.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

TOKENS, HEADS, HEAD_DIM = 14_040, 12, 128
ROWS = (14_040, 6_993, 4_176, 2_160, 1_080)
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient")
SPLITS = (2, 3, 4, 6)


def flash_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's flash kernel on [B, H, n, D] chunks: (out, log-sum-exp [B, H, n])."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, lse


def cudnn_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's kernel (the default SDPA backend on the H100) on [B, H, n, D] chunks: (out, log-sum-exp [B, H, n])."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, lse.reshape(out.shape[:-1])


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int, chunks=flash_chunks) -> torch.Tensor:
    """Attention of q [1, n, H, D] over k, v [1, N, H, D] with the keys in `splits` chunks, merged exactly.

    The chunks run as `splits` batch entries of one kernel call. Each chunk's output is softmax-normalised within
    the chunk; weighting by softmax over the chunks' log-sum-exps restores the softmax over all keys.
    """
    tokens, heads = k.shape[1], k.shape[2]
    # [1, N, H, D] -> [S, H, N/S, D] as a strided view: no copy of the keys and values.
    chunk_k = k.view(splits, tokens // splits, heads, -1).transpose(1, 2)
    chunk_v = v.view(splits, tokens // splits, heads, -1).transpose(1, 2)
    chunk_q = q.transpose(1, 2).expand(splits, -1, -1, -1).contiguous()
    out, lse = chunks(chunk_q, chunk_k, chunk_v)
    weights = torch.softmax(lse.float(), dim=0).unsqueeze(-1)  # [S, H, n, 1]
    return (weights * out.float()).sum(0, keepdim=True).transpose(1, 2).to(q.dtype)


def time_backend(backend: str, rows: int, repeats: int) -> float:
    generator = torch.Generator("cuda").manual_seed(rows)
    q = torch.randn(1, rows, HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, TOKENS, HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, TOKENS, HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=torch.bfloat16)
    if backend.startswith("split-"):
        splits = int(backend.removeprefix("split-"))
        run = lambda: split_kv_attention(q, k, v, splits)  # noqa: E731
        expected = dispatch_attention_fn(q, k, v, backend="_native_flash").float()
        error = (run().float() - expected).abs().max().item()
        if error > 2e-2:
            raise AssertionError(f"split-KV differs from flash attention by {error}")
    else:
        run = lambda: dispatch_attention_fn(q, k, v, backend=backend)  # noqa: E731
    return cuda_ms(run, repeats)


def cuda_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "times_ms": {}}
    for backend in (*BACKENDS, *(f"split-{splits}" for splits in SPLITS)):
        try:
            report["times_ms"][backend] = {rows: time_backend(backend, rows, args.repeats) for rows in ROWS}
        except Exception as error:  # a backend this build lacks
            report["times_ms"][backend] = {"error": f"{type(error).__name__}: {error}"[:200]}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    print(f"{report['device']}, torch {report['torch']}: ms per call (x per-row cost at n = N)")
    print(f"{'backend':<20}" + "".join(f"{rows:>16}" for rows in ROWS))
    for backend, times in report["times_ms"].items():
        if "error" in times:
            print(f"{backend:<20}{times['error']}")
            continue
        full = times[TOKENS] / TOKENS
        print(f"{backend:<20}" + "".join(f"{t:9.2f} ({t / rows / full:4.2f})" for rows, t in times.items()))


if __name__ == "__main__":
    main()
