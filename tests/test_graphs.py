"""CUDA-graph replay of PARTIAL forwards, on the CPU: torch.cuda's graph API is replaced by stand-ins that record
what is captured and replayed, so the protocol (warm call, capture, replay, failure) can be checked here. That a
real replay equals eager execution is checked on the GPU by benchmarks/gpu_transformer.py (`graph_check`)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import box_mask, tiny_inputs, tiny_transformer

import hetcache
from hetcache.engine import HetCacheEngine
from hetcache.hooks import engine_of
from hetcache.graphs import PartialGraphs


class FakeGraph:
    replays = 0

    def replay(self) -> None:
        self.replays += 1


class FakeStream:
    def __init__(self, device=None) -> None:
        self.device = device


@pytest.fixture
def fake_cuda(monkeypatch):
    """Stand-ins for torch.cuda's graph API; `failing["capture"] = True` makes the next capture raise."""
    failing = {"capture": False, "capturing": False}

    @contextlib.contextmanager
    def graph(cuda_graph, stream=None):
        if failing["capture"]:
            raise RuntimeError("operation not permitted when stream is capturing")
        failing["capturing"] = True
        yield
        failing["capturing"] = False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return failing


def test_warm_call_then_capture_then_replay_with_new_inputs_and_rows(fake_cuda):
    graphs = PartialGraphs()
    seen = []  # (x, rows buffer) each time the forward really runs
    rows_in_use = {}

    def forward(x, *, scale):
        seen.append((x, rows_in_use["rows"]))
        return (x * scale,)

    def use_rows(buffer, args, kwargs):
        # Inside the capture: what the engine derives from the rows (EMA weights) and the arguments (the timestep)
        # is then recomputed at replay, from the graph's own copies.
        assert fake_cuda["capturing"]
        rows_in_use["rows"], rows_in_use["x"] = buffer, args[0]
        assert kwargs == {"scale": 3.0}

    def step(value: float, rows: list[int], branch: str = "cond"):
        rows_in_use["rows"] = torch.tensor(rows)
        return graphs.run(branch, rows_in_use["rows"], (torch.full((2,), value),), {"scale": 3.0}, forward, use_rows)

    first = step(1.0, [0, 1])  # warm: eager, with the caller's tensors
    assert len(seen) == 1 and len(graphs) == 0 and torch.equal(first[0], torch.full((2,), 3.0))
    second = step(2.0, [0, 2])  # capture: the forward runs on the graph's copies of the inputs and rows
    assert len(seen) == 2 and len(graphs) == 1
    captured = graphs._captured[next(iter(graphs._captured))]
    assert seen[1][0] is captured.inputs[0] and seen[1][1] is captured.rows
    assert rows_in_use["x"] is captured.inputs[0]  # the engine saw the graph's copy of the arguments
    assert torch.equal(captured.rows, torch.tensor([0, 2])) and captured.graph.replays == 1
    assert torch.equal(second[0], torch.full((2,), 6.0)) and second[0] is not captured.output[0]
    step(5.0, [1, 2])  # replay: no Python forward; inputs and rows copied into the graph's buffers
    assert len(seen) == 2 and captured.graph.replays == 2
    assert torch.equal(captured.inputs[0], torch.full((2,), 5.0)) and torch.equal(captured.rows, torch.tensor([1, 2]))
    step(1.0, [0, 1], branch="uncond")  # another branch (or row count) is another key: warm first
    assert len(seen) == 3 and len(graphs) == 1
    step(1.0, [0, 1, 2])
    assert len(seen) == 4
    graphs.clear()
    step(1.0, [0, 1])  # after clear: warm again
    assert len(seen) == 5 and len(graphs) == 0


def test_failed_capture_falls_back_to_eager_for_good(fake_cuda):
    graphs = PartialGraphs()
    calls, handed = [], []
    forward = lambda x: calls.append(x) or x + 1  # noqa: E731
    rows = torch.tensor([3, 4])
    hand = lambda buffer, args, kwargs: handed.append(buffer)  # noqa: E731
    graphs.run("cond", rows, (torch.zeros(2),), {}, forward, hand)
    fake_cuda["capture"] = True
    out = graphs.run("cond", rows, (torch.zeros(2),), {}, forward, hand)
    assert torch.equal(out, torch.ones(2)) and len(calls) == 2  # the warm call and the eager fallback
    assert handed == [rows] and "not permitted" in graphs.failure  # the engine reads the step's own rows again
    fake_cuda["capture"] = False
    graphs.clear()  # a new video: still no capture
    for _ in range(3):
        graphs.run("cond", rows, (torch.zeros(2),), {}, forward, hand)
    assert len(calls) == 5 and len(graphs) == 0


def test_engine_runs_eagerly_and_says_so_after_a_failed_capture(fake_cuda, monkeypatch):
    """The engine's output does not change when a capture fails, and the video's stats explain why."""
    monkeypatch.setattr(HetCacheEngine, "_use_graphs", lambda self, device: self.graphs is not None and self.graphs.failure is None)
    mask = box_mask((3, 4, 6), slice(1, 3), slice(2, 4))
    text = tiny_inputs(0)["encoder_hidden_states"]  # one prompt for the video, as in a pipeline (new text drops graphs)
    steps = [(dict(tiny_inputs(seed), encoder_hidden_states=text), t) for seed, t in enumerate((900.0, 800.0, 700.0, 600.0))]

    def run(graphs: bool) -> list[torch.Tensor]:
        model = tiny_transformer()
        config = hetcache.HetCacheConfig(plan="FPPP", margin=1, ema_alpha=0.3, cuda_graphs=graphs)
        hetcache.enable(model, config, mask=mask)
        with torch.no_grad():
            outputs = []
            for x, t in steps:
                with model.cache_context("cond"):
                    outputs.append(model(timestep=torch.tensor([t]), return_dict=False, **x)[0])
        run.stats = hetcache.stats(model)
        run.engine = engine_of(model)
        return outputs

    eager = run(False)
    fake_cuda["capture"] = True
    fallback = run(True)
    assert all(torch.equal(a, b) for a, b in zip(eager, fallback))
    assert run.engine.graphs.failure is not None and not run.engine._use_graphs(torch.device("cuda"))
    assert any(note.startswith("CUDA graphs off") for note in run.stats.notes)
