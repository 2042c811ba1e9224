"""Context parallelism (Ulysses) of the stock WanVACE transformer over 2 and 4 CPU processes (gloo).

Each group of processes is started once per module and runs every scenario; each rank writes what it measured to
a JSON file and the tests below judge those. The processes are forked, so they start with torch and diffusers
already imported (spawned ones spend most of the file's time importing them again). A scenario's one-process reference
is computed by the same rank before it enables context parallelism: no collective runs for it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from hetcache import parallel
from hetcache.errors import UserError

# Largest |CP - one process| accepted, float32 on transformer outputs of magnitude 2 to 20 (measured here: 0.0;
# with HetCache up to 1.1e-6, docs/PARALLEL.md), and on the frames in levels of 255: a difference in the last bits
# of the latents can move a pixel across a rounding boundary.
TOLERANCE = 1e-5
FRAME_TOLERANCE = 1
BF16_FACTOR = 1000  # bfloat16 keeps 8 bits of mantissa: 1e-2 on the same outputs (measured: 0.0)
EVEN_GRID = (3, 4, 6)  # 72 tokens: 36 per rank on 2, 18 on 4
UNEVEN_GRID = (3, 3, 5)  # 45 tokens: a multiple of neither 2 nor 4

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and "fork" in multiprocessing.get_all_start_methods()),
    reason="needs torch.distributed with gloo and forked processes",
)


# ----------------------------------------------------------------------------------------- inside each rank
def _forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, timestep=torch.tensor([500]), return_dict=False)[0]


def _stock(grid: tuple[int, int, int], heads: int = 2, **options) -> dict:
    """CP output vs one process, and how many tokens the last main block saw on this rank."""
    from tiny_models import tiny_inputs, tiny_transformer

    model = tiny_transformer(heads=heads)
    inputs = tiny_inputs(grid=grid)
    reference = _forward(model, inputs)
    parallel.enable_context_parallel(model, **options)
    seen = []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    output = _forward(model, inputs)
    return {"diff": (output - reference).abs().max().item(), "scale": reference.abs().max().item(), "tokens": seen[0]}


def _refusal(action) -> str:
    try:
        action()
    except UserError as error:
        return str(error)
    return "no error"


def _uneven_refused(heads: int = 2) -> str:
    from tiny_models import tiny_inputs, tiny_transformer

    model = tiny_transformer(heads=heads)
    parallel.enable_context_parallel(model)
    return _refusal(lambda: _forward(model, tiny_inputs(grid=UNEVEN_GRID)))


def _hooked_refused() -> str:
    from tiny_models import tiny_transformer

    import hetcache

    model = tiny_transformer()
    hetcache.enable(model)
    return _refusal(lambda: parallel.enable_context_parallel(model))


def _twice_refused() -> str:
    from tiny_models import tiny_transformer

    model = tiny_transformer()
    parallel.enable_context_parallel(model)
    return _refusal(lambda: parallel.enable_context_parallel(model))


def _heads_refused() -> str:
    from tiny_models import tiny_transformer

    return _refusal(lambda: parallel.enable_context_parallel(tiny_transformer(heads=2)))


def _backend_refused() -> str:
    from diffusers.models.attention_dispatch import attention_backend
    from tiny_models import tiny_transformer

    with attention_backend("_native_math"):  # no context-parallel support in diffusers
        return _refusal(lambda: parallel.enable_context_parallel(tiny_transformer()))


def _diffusers_path() -> dict:
    """diffusers' own `enable_parallelism` with our plan (made to run on the CPU by claiming one accelerator)
    against `enable_context_parallel`'s CPU path; and whether `enable_parallelism` still fails on the CPU."""
    from diffusers import ContextParallelConfig
    from tiny_models import tiny_inputs, tiny_transformer

    try:
        tiny_transformer().enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=parallel.VACE_CP_PLAN)
        cpu_status = "works"
    except ZeroDivisionError:
        cpu_status = "ZeroDivisionError"
    inputs = tiny_inputs(grid=EVEN_GRID)
    theirs = tiny_transformer()
    with mock.patch("torch.accelerator.device_count", return_value=1):
        theirs.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=parallel.VACE_CP_PLAN)
    ours = tiny_transformer()
    parallel.enable_context_parallel(ours)
    return {"cpu_status": cpu_status, "diff": (_forward(theirs, inputs) - _forward(ours, inputs)).abs().max().item()}


def _pipeline(dtype: str, heads: int = 2) -> dict:
    """The tiny-random WanVACEPipeline end to end (3 steps, CFG): every transformer output and the frames."""
    from tiny_models import demo_clip, with_heads

    from hetcache.pipeline import load_pipeline, run_edit

    pipe = load_pipeline("tiny-random", device="cpu", dtype=dtype, height=64, width=128)
    if heads != 2:
        with_heads(pipe, heads)
    video, mask = demo_clip(frames=9, height=64, width=128)
    outputs: list[torch.Tensor] = []
    pipe.transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0].float()))

    def edit() -> tuple:
        outputs.clear()
        frames = run_edit(pipe, video, mask, "an empty road", steps=3, guidance=5.0, seed=0).frames
        return frames, list(outputs)

    reference_frames, reference_outputs = edit()
    parallel.enable_context_parallel(pipe.transformer)
    frames, step_outputs = edit()
    return {
        "calls": len(step_outputs),
        "diff": max((a - b).abs().max().item() for a, b in zip(step_outputs, reference_outputs)),
        "scale": max(a.abs().max().item() for a in reference_outputs),
        "frame_diff": int(abs(frames.astype(int) - reference_frames.astype(int)).max()),
    }


def _inputs_from_rank_0() -> dict:
    """`launch.from_main` as a torchrun launch uses it: rank 0 reads, every rank gets its inputs; a UserError of
    rank 0's read ends the others with exit code 2 and no message of their own."""
    import numpy as np

    from hetcache import launch
    from hetcache.video import PreparedInputs

    rank = dist.get_rank()
    generator = np.random.default_rng(rank)  # a rank other than 0 that read would get other frames
    reads = []

    def read() -> PreparedInputs:
        reads.append(rank)
        return PreparedInputs(video=generator.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8),
                              mask=generator.random((5, 4, 6)) > 0.5, fps=12.5)

    def failing() -> PreparedInputs:
        raise UserError("video not found: missing.mp4: check the path")

    launch._launch = launch._Launch(rank, torch.device("cpu"))  # what `launch.processes` sets on joining
    try:
        prepared = launch.from_main(read)
        try:
            launch.from_main(failing)
            failure = "no error"
        except UserError as error:
            failure = f"UserError: {error}"
        except SystemExit as done:
            failure = f"exit {done.code}"
    finally:
        launch._launch = None
    return {"reads": reads, "video": prepared.video.tolist(), "mask": prepared.mask.tolist(), "fps": prepared.fps,
            "failure": failure}


def _mesh() -> dict:
    """Two independent 2-way Ulysses groups inside 4 processes, given as a mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("batch", "ring", "ulysses"))
    return _stock(EVEN_GRID, mesh=mesh)


SCENARIOS = {
    2: {
        "even": lambda: _stock(EVEN_GRID),
        "uneven_refused": _uneven_refused,
        "hooked_refused": _hooked_refused,
        "twice_refused": _twice_refused,
        "backend_refused": _backend_refused,
        "diffusers_path": _diffusers_path,
        "pipeline": lambda: _pipeline("fp32"),
        "pipeline_bf16": lambda: _pipeline("bf16"),
        "inputs_from_rank_0": _inputs_from_rank_0,
    },
    4: {
        "even": lambda: _stock(EVEN_GRID, heads=4),
        "uneven_refused": lambda: _uneven_refused(heads=4),
        "heads_refused": _heads_refused,
        "mesh": _mesh,
        "pipeline": lambda: _pipeline("fp32", heads=4),
    },
}


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, scenarios: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    info = parallel.init_process_group("cpu", timeout=timedelta(seconds=60))
    results = {"rank": info.rank, "world_size": info.world_size, "main": parallel.is_main_process()}
    for name, scenario in scenarios.items():
        results[name] = scenario()
    dist.barrier()  # rank 0 hosts the store: it must not leave while others still set up groups with it
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_ranks(scenarios: dict, world_size: int, out_dir: Path) -> list[dict]:
    """Every rank's results of `scenarios` ({name: callable returning JSON-ready data}) in `world_size` forked
    processes joined over gloo, in rank order."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(
        _rank_main, args=(world_size, port, str(out_dir), scenarios), nprocs=world_size, start_method="fork"
    )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(SCENARIOS[2], 2, tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(SCENARIOS[4], 4, tmp_path_factory.mktemp("cp4"))


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world_size", [2, 4])
def test_stock_context_parallel_matches_one_process(world_size, two_ranks, four_ranks):
    ranks = {2: two_ranks, 4: four_ranks}[world_size]
    assert [r["rank"] for r in ranks] == list(range(world_size))
    assert [r["main"] for r in ranks] == [True] + [False] * (world_size - 1)
    for result in ranks:
        even = result["even"]
        assert even["tokens"] == 72 // world_size  # the blocks really ran on a shard
        assert even["scale"] > 1.0
        assert even["diff"] <= TOLERANCE


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_token_count_the_degree_does_not_divide_is_refused(world_size, two_ranks, four_ranks):
    for result in {2: two_ranks, 4: four_ranks}[world_size]:
        message = result["uneven_refused"]
        assert message.startswith("the video's 45 tokens (3 x 3 x 5 latent frames x rows x columns) do not split")
        assert f"evenly over {world_size} processes" in message


def test_heads_the_degree_does_not_divide_are_refused(four_ranks):
    for result in four_ranks:
        assert result["heads_refused"] == (
            "the model's 2 attention heads do not split over 4 processes: use a number of processes that divides 2"
        )


def test_a_mesh_with_two_ulysses_groups(four_ranks):
    for result in four_ranks:
        assert result["mesh"]["tokens"] == 36
        assert result["mesh"]["diff"] <= TOLERANCE


@pytest.mark.parametrize(("world_size", "dtype"), [(2, "fp32"), (2, "bf16"), (4, "fp32")])
def test_tiny_pipeline_on_several_processes_matches_one(world_size, dtype, two_ranks, four_ranks):
    for result in {2: two_ranks, 4: four_ranks}[world_size]:
        pipeline = result["pipeline" if dtype == "fp32" else "pipeline_bf16"]
        assert pipeline["calls"] == 6  # 3 steps x (cond, uncond)
        assert pipeline["scale"] > 0.5
        assert pipeline["diff"] <= TOLERANCE * (1 if dtype == "fp32" else BF16_FACTOR)
        assert pipeline["frame_diff"] <= FRAME_TOLERANCE


def test_only_rank_0_reads_the_inputs_and_reports_their_errors(two_ranks):
    rank0, rank1 = (result["inputs_from_rank_0"] for result in two_ranks)
    assert rank0["reads"] == [0] and rank1["reads"] == []
    assert rank1["video"] == rank0["video"] and rank1["mask"] == rank0["mask"] and rank1["fps"] == rank0["fps"] == 12.5
    assert rank0["failure"] == "UserError: video not found: missing.mp4: check the path"
    assert rank1["failure"] == "exit 2"


def test_a_transformer_with_other_hooks_is_refused(two_ranks):
    for result in two_ranks:
        assert "before anything else hooks it (it has: hetcache)" in result["hooked_refused"]


def test_enabling_twice_is_refused(two_ranks):
    for result in two_ranks:
        assert result["twice_refused"] == "context parallelism is already enabled on this transformer"


def test_an_attention_backend_without_cpu_context_parallelism_is_refused(two_ranks):
    for result in two_ranks:
        assert result["backend_refused"] == (
            "context parallelism on the CPU needs diffusers' native attention backend, not _native_math: "
            "the other backends that support it run on CUDA only"
        )


def test_diffusers_enable_parallelism_gives_the_same_output(two_ranks):
    for result in two_ranks:
        assert result["diffusers_path"]["diff"] == 0.0


def test_enable_parallelism_still_fails_on_the_cpu(two_ranks):
    """When diffusers fixes this, `parallel._enable_on_cpu` can go: use `enable_parallelism` everywhere."""
    for result in two_ranks:
        assert result["diffusers_path"]["cpu_status"] == "ZeroDivisionError"


def test_private_diffusers_names_the_cpu_path_uses():
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
    )
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from tiny_models import tiny_transformer

    model = tiny_transformer()
    assert model._parallel_config is None
    processors = [block.attn1.processor for block in (*model.blocks, *model.vace_blocks)]
    assert all(isinstance(p, WanAttnProcessor) for p in processors)
    assert all(p._parallel_config is None and p._attention_backend is None for p in processors)
    assert AttentionBackendName(_AttentionBackendRegistry.get_active_backend()[0]) == AttentionBackendName.NATIVE


def test_not_started_by_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="not started by torchrun .*torchrun --nproc-per-node N"):
        parallel.init_process_group("cpu")


def test_without_a_process_group():
    from tiny_models import tiny_transformer

    assert parallel.is_main_process()
    with pytest.raises(UserError, match="needs a process group"):
        parallel.enable_context_parallel(tiny_transformer())
