"""Sequence parallelism (Ulysses) for diffusers' `WanVACETransformer3DModel`, on diffusers' context-parallel hooks.

diffusers 0.42 ships a context-parallel plan for `WanTransformer3DModel` but none for the VACE model.
`VACE_CP_PLAN` is one, in diffusers' own format, and `enable_context_parallel` applies it with diffusers'
`enable_parallelism`. What each rank holds during a forward:

- the RoPE tables are split by token (as in diffusers' Wan plan), so every block rotates its own tokens;
- the first VACE block splits both token streams it receives: the latent tokens (its `proj_in` adds them to the
  control tokens) and the control tokens. Each later VACE block takes its control tokens from the one before, so
  every hint comes out split the same way;
- the first main block splits the latent tokens again (the forward hands the unsplit ones to both loops), so a
  hint and the latent tokens it is added to are the same token shard: the hint additions need no communication;
- the text is not split: cross-attention is per query token, so each rank attends from its tokens to all text;
- self-attention is where the ranks meet: `WanAttnProcessor` hands the config to `dispatch_attention_fn`, and
  diffusers' Ulysses attention trades token shards for head shards (one all-to-all each for Q, K and V), attends
  over all tokens for its heads, and trades back (one all-to-all for the output);
- `proj_out`'s output is all-gathered, so every rank returns the whole prediction.

Ulysses needs the token count and the head count to be multiples of the degree; other counts are refused with
a message. Two diffusers modes are not offered because the CPU tests cannot run them: "Ulysses anything"
(uneven shards) ends in an all-gather of unequal sizes, which gloo rejects, and ring attention needs an attention
backend that returns the log-sum-exp, which only CUDA backends (flash, cuDNN, SAGE) do. docs/PARALLEL.md has the
launch and the numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanVACETransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import (
    apply_context_parallel,
    remove_context_parallel,
)
from diffusers.models._modeling_parallel import (
    ContextParallelInput,
    ContextParallelOutput,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hetcache import compat
from hetcache.comm import CommLedger
from hetcache.errors import UserError

# Module name -> how its inputs (dict) are split or its output (ContextParallelOutput) gathered; see the module
# docstring for why each entry is there.
VACE_CP_PLAN: dict[str, Any] = {
    "rope": {
        0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
    },
    "vace_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        "control_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
    },
    "blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}
# The splits alone: what HetCache's engine does itself (it keeps the output gather).
SPLIT_PLAN = {name: plan for name, plan in VACE_CP_PLAN.items() if name != "proj_out"}

ROOT_HOOK = "hetcache_context_parallel"
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the group, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_process_group(device: str | torch.device | None = None, *, timeout: timedelta | None = None) -> RankInfo:
    """Join the process group that torchrun describes in the environment.

    CUDA (the default where available): NCCL for GPU tensors and gloo for CPU tensors, each rank on the GPU of its
    LOCAL_RANK. CPU: gloo. `timeout`: how long a collective waits for the other ranks before failing (torch's
    default otherwise). Joining twice returns the same answer.
    """
    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"not started by torchrun ({', '.join(missing)} unset): launch with torchrun --nproc-per-node N ..."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {local_rank} of this machine has no GPU: it has {torch.cuda.device_count()}; "
                "start at most that many processes per machine"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"context parallelism runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_main_process() -> bool:
    """Rank 0 of the group, or the only process: the one that reads inputs and writes outputs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def enable_context_parallel(
    transformer: WanVACETransformer3DModel,
    degree: int | None = None,
    *,
    mesh: DeviceMesh | None = None,
) -> ContextParallelConfig:
    """Shard `transformer`'s token sequence over `degree` processes (default: all) with Ulysses attention.

    Call it on every rank, after `init_process_group`, on a transformer with no other hooks yet, placed on this
    rank's device. Every rank then runs the same forward calls with the same inputs and gets the whole output.
    `mesh`: a diffusers-style device mesh with dimensions "ring" (size 1) and "ulysses", for sharing the group
    with another kind of parallelism; `degree` is then its "ulysses" size. The model's head count and every
    video's token count must be multiples of the degree. `hetcache.enable` works on such a transformer: HetCache
    then splits the tokens itself (`hetcache.shard`).
    """
    if not isinstance(transformer, WanVACETransformer3DModel):
        raise TypeError(f"expected a WanVACETransformer3DModel, got {type(transformer).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            "context parallelism needs a process group: launch with torchrun and call "
            "hetcache.parallel.init_process_group() first"
        )
    hooks = list(HookRegistry.check_if_exists_or_initialize(transformer).hooks)
    if ROOT_HOOK in hooks:
        raise UserError("context parallelism is already enabled on this transformer")
    if hooks:
        raise UserError(
            f"enable context parallelism on a transformer before anything else hooks it (it has: {', '.join(hooks)})"
        )
    degree = _degree(degree, mesh)
    heads = transformer.config.num_attention_heads
    if heads % degree:
        raise UserError(f"the model's {heads} attention heads do not split over {degree} processes: "
                        f"use a number of processes that divides {heads}")
    if mesh is None:  # built here rather than by diffusers, so that the Ulysses group is at hand (`ulysses_group`)
        mesh = init_device_mesh(transformer.device.type, (1, degree), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
    if transformer.device.type == "cpu":
        _enable_on_cpu(transformer, config)
    else:
        transformer.enable_parallelism(config=config, cp_plan=VACE_CP_PLAN)
    ulysses = mesh["ulysses"]
    group = UlyssesGroup(degree, ulysses.get_local_rank(), ulysses.get_group(), config,
                         compat.parallel_config(transformer), CommLedger(degree))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(ContextParallelRoot(group), ROOT_HOOK)
    _count_stock_communication(transformer, group.ledger)
    return config


@dataclass(frozen=True)
class UlyssesGroup:
    """The context-parallel group of a transformer, as the HetCache engine needs it."""

    degree: int
    rank: int  # this process's place in the Ulysses group: it holds token chunk `rank` and heads `rank` x H / P on
    group: dist.ProcessGroup
    config: ContextParallelConfig
    parallel_config: Any  # diffusers' ParallelConfig of the model, which its Ulysses attention reads
    ledger: CommLedger

    def global_rank(self, rank: int) -> int:
        """The process-group rank of Ulysses rank `rank` (collectives name their source or destination by it)."""
        return dist.get_global_rank(self.group, rank)


class ContextParallelRoot(ModelHook):
    """Transformer-level hook of context parallelism: refuses, with a message, a video whose token count the
    degree does not divide (diffusers would stop on a bare assert deep in the first block), counts each call's
    communication, and records whether the stock token split or the HetCache engine splits the tokens."""

    def __init__(self, group: UlyssesGroup) -> None:
        super().__init__()
        self.group = group
        self.engine_splits = False
        self._opened = False

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        grid = [size // patch for size, patch in zip(hidden_states.shape[2:], module.config.patch_size)]
        tokens = math.prod(grid)
        degree = self.group.degree
        if tokens % degree:
            raise UserError(
                f"the video's {tokens} tokens ({' x '.join(map(str, grid))} latent frames x rows x columns) do not "
                f"split evenly over {degree} processes: choose a size and frame count whose token count is a "
                f"multiple of {degree}, or run on a number of processes that divides {tokens}"
            )
        self._opened = self.group.ledger.open_call("F")  # a call no HetCache engine opened: the stock forward
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self._opened:
            self.group.ledger.close_call()
        return output


def ulysses_group(transformer: torch.nn.Module) -> UlyssesGroup | None:
    """The context-parallel group of `transformer`, or None when `enable_context_parallel` was not called on it."""
    registry = compat.hook_registry(transformer)
    root = registry.get_hook(ROOT_HOOK) if registry is not None else None
    return root.group if root is not None else None


def hand_split_to_engine(transformer: torch.nn.Module) -> None:
    """Remove the stock plan's token splits (RoPE, first VACE and main block): the HetCache engine, whose hooks
    run before them, splits the tokens itself. The output gather stays."""
    root = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(ROOT_HOOK)
    if not root.engine_splits:
        remove_context_parallel(transformer, SPLIT_PLAN)
        root.engine_splits = True


def restore_stock_split(transformer: torch.nn.Module) -> None:
    """Put the stock plan's token splits back (after the engine's hooks are gone)."""
    registry = compat.hook_registry(transformer)
    root = registry.get_hook(ROOT_HOOK) if registry is not None else None
    if root is not None and root.engine_splits:
        apply_context_parallel(transformer, root.group.config, SPLIT_PLAN)
        root.engine_splits = False


def _count_stock_communication(transformer: WanVACETransformer3DModel, ledger: CommLedger) -> None:
    """PyTorch hooks that count what diffusers' own context-parallel code moves: each stock self-attention's
    four all-to-alls (the HetCache engine never calls these modules: it counts its own) and the output gather."""

    def attention(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        ledger.stock_attention(hidden_states.shape[1], hidden_states.shape[2], hidden_states.dtype)

    def gathered(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        ledger.all_gather(output.narrow(1, 0, output.shape[1] // ledger.degree))

    for block in (*transformer.blocks, *transformer.vace_blocks):
        block.attn1.register_forward_pre_hook(attention, with_kwargs=True)
    transformer.proj_out.register_forward_hook(gathered)


def _degree(degree: int | None, mesh: DeviceMesh | None) -> int:
    world_size = dist.get_world_size()
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if "ring" not in names or "ulysses" not in names or mesh["ring"].size() != 1:
            raise UserError(f"the mesh needs a 'ring' dimension of size 1 and a 'ulysses' dimension, got {names}")
        mesh_degree = mesh["ulysses"].size()
        if degree not in (None, mesh_degree):
            raise UserError(f"degree {degree} does not match the mesh's ulysses size {mesh_degree}")
        degree = mesh_degree
    elif degree is None:
        degree = world_size
    elif degree != world_size:
        raise UserError(
            f"degree {degree} needs as many processes, but {world_size} were started: "
            f"pass a mesh to use part of the group"
        )
    if degree < 2:
        raise UserError(f"context parallelism needs at least 2 processes, got {degree}")
    return degree


def _enable_on_cpu(transformer: WanVACETransformer3DModel, config: ContextParallelConfig) -> None:
    """`ModelMixin.enable_parallelism`'s context-parallel steps, with the CPU as the device.

    diffusers 0.42.1 `ModelMixin._resolve_parallel_config` puts each rank on device
    `rank % torch.accelerator.device_count()`, a division by zero where there is no accelerator. This repeats what
    `enable_parallelism` does for a context-parallel config: check the attention backend, set the config up on the
    mesh, record it on the model and on every attention processor (`compat.record_parallel_config`), register the
    plan's hooks. tests/test_parallel.py fails when `enable_parallelism` starts working on the CPU (this function
    can then go).
    """
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import AttentionBackendName

    if compat.parallel_config(transformer) is not None:
        raise UserError("parallelism is already enabled on this transformer")
    attention = [m for m in transformer.modules() if isinstance(m, AttentionModuleMixin)]
    for module in attention:
        backend = AttentionBackendName(compat.attention_backend(module) or compat.active_attention_backend())
        if backend != AttentionBackendName.NATIVE:
            raise UserError(
                f"context parallelism on the CPU needs diffusers' native attention backend, not {backend.value}: "
                "the other backends that support it run on CUDA only"
            )
    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=config.mesh)
    compat.record_parallel_config(transformer, parallel, attention)
    apply_context_parallel(transformer, config, VACE_CP_PLAN)
