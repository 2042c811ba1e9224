"""Where a compiled PARTIAL forward at small r spends its time, on the real-size 1.3B configuration (GPU only).

Issue 5's bound for PARTIAL is 1.1 x r x FULL + 2 ms. With `compile=True` the step at r = 0.15 lands a few
per cent over it. This script separates the three possible causes:

1. the attention kernel at few query rows: default SDPA time for n = 1,024 ... 3,072 query rows against all
   14,040 keys in steps of 64 rows. If the cost steps at multiples of 128 x 11 rows (11 query tiles x 12 heads
   fill the H100's 132 multiprocessors once), the penalty is the last wave of thread blocks running part-empty.
   It also times ways round that: the query rows cut in two and run on two CUDA streams (so the second cut's
   blocks fill the first one's idle multiprocessors), both CFG branches in one call (batch 2), and split-KV
   (S key chunks as S batch entries of one cuDNN call, merged by log-sum-exp: `split_kv_attention` in
   attention_backends.py) for S = 1-6 at several row counts;
2. idle device time between kernels (the host not keeping ahead): a kernel timeline of one compiled FULL and one
   compiled PARTIAL forward, busy time as the union of kernel intervals against the span, kernel time by kind;
3. host launch work as such: the same compiled forwards replayed as one CUDA graph.

    python benchmarks/partial_small_r.py --out partial_small_r.json

Prints a table last and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hetcache  # noqa: E402
from attention_backends import cuda_ms as cuda_time  # noqa: E402
from attention_backends import cudnn_chunks, split_kv_attention  # noqa: E402
from gpu_transformer import box_coverage, build_model, make_inputs, real_setting  # noqa: E402
from hetcache.hooks import engine_of  # noqa: E402

TOKENS, HEADS, HEAD_DIM = 14_040, 12, 128
R015_ROWS = 2_106  # rows of the r = 0.15 box at 9 x 30 x 52 tokens (gpu4.json)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)


def two_stream_attention(q, k, v, cut: int, streams: tuple[torch.cuda.Stream, torch.cuda.Stream]) -> torch.Tensor:
    """Rows [:cut] and [cut:] of q on two streams, so the second call's blocks can fill idle multiprocessors."""
    current = torch.cuda.current_stream()
    outputs = []
    for stream, part in zip(streams, (q[:, :cut], q[:, cut:])):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            outputs.append(attention(part, k, v))
    for stream, out in zip(streams, outputs):
        current.wait_stream(stream)
        out.record_stream(current)
    return torch.cat(outputs, 1)


def attention_study() -> dict:
    generator = torch.Generator("cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    k, v = randn(2, TOKENS, HEADS, HEAD_DIM), randn(2, TOKENS, HEADS, HEAD_DIM)
    q_all = randn(2, TOKENS, HEADS, HEAD_DIM)
    out = {"full_n_ms": cuda_time(lambda: attention(q_all[:1], k[:1], v[:1]))}
    out["sweep_ms"] = {n: cuda_time(lambda n=n: attention(q_all[:1, :n], k[:1], v[:1])) for n in range(1024, 3073, 64)}
    q = q_all[:1, :R015_ROWS].contiguous()
    out["r015_ms"] = cuda_time(lambda: attention(q, k[:1], v[:1]))
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    reference = attention(q, k[:1], v[:1]).float()
    out["two_stream_ms"] = {}
    for cut in (1408, R015_ROWS // 2, 1024):
        got = two_stream_attention(q, k[:1], v[:1], cut, streams).float()
        error = float((got - reference).abs().max())
        out["two_stream_ms"][cut] = {"ms": cuda_time(lambda cut=cut: two_stream_attention(q, k[:1], v[:1], cut, streams)),
                                    "max_abs_err": error}
    q2 = q_all[:, :R015_ROWS].contiguous()
    out["cfg_batch2_ms"] = cuda_time(lambda: attention(q2, k, v))
    out["split_kv"] = {}
    for n in (1472, 2160, 2816, 3600, 4176, 5826, 7020):
        q = q_all[:1, :n].contiguous()
        reference = attention(q, k[:1], v[:1]).float()
        row = {"ms": {}, "max_abs_err": {}}
        for splits in range(1, 7):
            if splits == 1:
                run = lambda q=q: attention(q, k[:1], v[:1])  # noqa: E731
            else:
                run = lambda q=q, s=splits: split_kv_attention(q, k[:1], v[:1], s, cudnn_chunks)  # noqa: E731
            try:
                row["max_abs_err"][splits] = float((run().float() - reference).abs().max())
                row["ms"][splits] = cuda_time(run)
            except Exception as error:  # report, do not stop the other measurements
                row["error"] = f"{type(error).__name__}: {error}"[:300]
                break
        out["split_kv"][n] = row
    return out


def kernel_timeline(fn) -> dict:
    """One call of fn under the profiler: device span, busy time (union of kernel intervals), time by kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA and event.duration_ns() > 0:
            kernels.append((event.start_ns(), event.start_ns() + event.duration_ns(), event.name()))
    kernels.sort()
    busy, end_so_far, gaps = 0, None, []
    for start, end, _ in kernels:
        if end_so_far is None or start >= end_so_far:
            if end_so_far is not None:
                gaps.append(start - end_so_far)
            busy += end - start
            end_so_far = end
        elif end > end_so_far:
            busy += end - end_so_far
            end_so_far = end
    kinds: dict[str, float] = {}
    for start, end, name in kernels:
        lowered = name.lower()
        kind = ("attention" if "fprop" in lowered or "flash" in lowered or "attention" in lowered
                else "gemm" if any(key in lowered for key in ("nvjet", "gemm", "xmma", "cutlass"))
                else "triton" if lowered.startswith("triton") else "other")
        kinds[kind] = kinds.get(kind, 0.0) + (end - start) / 1e6
    gaps.sort(reverse=True)
    return {
        "kernels": len(kernels),
        "span_ms": (kernels[-1][1] - kernels[0][0]) / 1e6 if kernels else 0.0,
        "busy_ms": busy / 1e6,
        "largest_gaps_ms": [gap / 1e6 for gap in gaps[:5]],
        "gaps_over_20us": sum(1 for gap in gaps if gap > 20_000),
        "ms_by_kind": kinds,
    }


def graph_replay_ms(call) -> float | str:
    """fn captured once as a CUDA graph and replayed; a string says why capture failed."""
    try:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            call()
        torch.cuda.synchronize()
        return cuda_time(graph.replay)
    except Exception as error:  # report, do not stop the other measurements
        return f"{type(error).__name__}: {error}"[:300]


def engine_study(model, inputs, grid) -> dict:
    timestep = torch.tensor([500.0], device="cuda")  # made once: a host-to-device copy cannot be captured

    def call() -> torch.Tensor:
        with model.cache_context("cond"):
            return model(timestep=timestep, return_dict=False, **inputs)[0]

    sweep = dict(margin=0, margin_ratio=0.0, context_ratio=0.0, selection="uniform", compile=True, cuda_graphs=False)
    out = {}
    for name, plan, fraction in (("full", "F" * 40 + "P", 0.5), ("partial_r015", "F" + "P" * 40, 0.15)):
        hetcache.enable(model, hetcache.HetCacheConfig(plan=plan, **sweep), token_mask=box_coverage(grid, fraction))
        engine = engine_of(model)
        row = {"ms": cuda_time(call, warmup=4)}
        row["rows"] = hetcache.stats(model).rows[-1]
        row["timeline"] = kernel_timeline(call)
        session = engine.session
        if name == "partial_r015":  # the same rows at every index: no new selection during capture
            fixed = session.step_rows[max(session.step_rows)]
            session.partial_rows = lambda index, fixed=fixed: fixed
        else:  # no selection during capture
            session.selection_step = -2
            session.select_context = lambda index, hidden_states, scores: None
        row["graph_ms"] = graph_replay_ms(call)
        hetcache.disable(model)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for every number")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    setting = real_setting()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report["attention"] = attention_study()
    model = build_model(setting)
    report["engine"] = engine_study(model, make_inputs(setting), setting.grid)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)


def print_table(report: dict) -> None:
    att = report["attention"]
    per_row_full = att["full_n_ms"] / TOKENS
    print(f"{report['device']}, torch {report['torch']}")
    print(f"attention, n query rows vs {TOKENS} keys (ms, x per-row cost at n = N = {att['full_n_ms']:.2f} ms):")
    print("  " + "  ".join(f"{n}:{ms:.3f}({ms / n / per_row_full:.2f})" for n, ms in att["sweep_ms"].items()))
    print(f"  r=0.15 ({R015_ROWS} rows): one call {att['r015_ms']:.3f} ms; two streams "
          + ", ".join(f"cut {cut}: {v['ms']:.3f} ms (err {v['max_abs_err']:.1e})" for cut, v in att["two_stream_ms"].items())
          + f"; CFG batch 2: {att['cfg_batch2_ms']:.3f} ms ({att['cfg_batch2_ms'] / 2:.3f} per branch)")
    print("split-KV on cuDNN (ms for S = 1..6 key chunks; max abs error vs one call):")
    for n, row in att["split_kv"].items():
        if "error" in row:
            print(f"  n={n:>5}: {row['error']}")
        print(f"  n={n:>5}: " + "  ".join(f"{ms:.3f}" for ms in row["ms"].values())
              + f"   err <= {max(row['max_abs_err'].values(), default=0.0):.1e}")
    full = report["engine"]["full"]
    for name, row in report["engine"].items():
        line = row["timeline"]
        graph = row["graph_ms"]
        graph_text = f"{graph:.1f} ms" if isinstance(graph, float) else graph
        print(f"compiled {name} ({row['rows']} rows): {row['ms']:.1f} ms ({row['ms'] / full['ms']:.3f} x FULL); "
              f"graph replay {graph_text}")
        print(f"  timeline: span {line['span_ms']:.1f} ms, busy {line['busy_ms']:.1f} ms, {line['kernels']} kernels, "
              f"{line['gaps_over_20us']} gaps > 20 us, largest {[round(g, 3) for g in line['largest_gaps_ms']]}; "
              + ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(line["ms_by_kind"].items())))
    partial = report["engine"]["partial_r015"]
    limit = 1.1 * partial["rows"] / TOKENS * full["ms"] + 2.0
    print(f"bound at r = {partial['rows'] / TOKENS:.4f}: {limit:.1f} ms ({limit / full['ms']:.3f} x FULL)")


if __name__ == "__main__":
    main()
