"""Commands on several processes: `torchrun --nproc-per-node N -m hetcache edit|bench ...`.

torchrun starts N copies of the command line. Each joins the process group (`parallel.init_process_group`: NCCL
with gloo for CPU tensors on GPUs, each rank on the GPU of its LOCAL_RANK; gloo on the CPU) and runs the whole
command, so every rank makes the same pipeline calls with the same inputs and seed: the text encoder and the VAE
run whole on every rank, the transformer splits its tokens over the ranks (`parallel.enable_context_parallel`,
applied by `load_pipeline` through `parallelize`). Rank 0 reads the inputs and sends them to the others
(`from_main`), prints, and writes the outputs; the other ranks write nothing and print only their `error:` lines.
On success rank 0 ends with a `parallel` summary per transformer: the HetCache cache one process would hold, and
per rank its cache bytes and the bytes it received per call of each step kind (`comm.summary`).

Importing this module loads neither torch nor diffusers: the CLI imports it before any command runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from hetcache.errors import UserError

COMMANDS = ("edit", "bench")  # the commands that run on several processes
USER_ERROR_EXIT = 2


class _Launch:
    """This process's place in a torchrun launch, and the transformers it split."""

    def __init__(self, rank: int, device: Any) -> None:
        self.rank, self.device = rank, device
        self.transformers: list[tuple[str, Any]] = []  # (pipeline attribute, transformer)


_launch: _Launch | None = None


def is_main() -> bool:
    """Whether this process reads inputs, prints and writes outputs: rank 0 of a launch, or a lone process."""
    return _launch is None or _launch.rank == 0


@contextlib.contextmanager
def processes(argv: list[str]) -> Iterator[None]:
    """Run the command line `argv` (without the program name) as one of torchrun's processes: join the group,
    keep the other ranks quiet, and on success print the summary and leave the group together. Without torchrun
    (or with one process) nothing changes."""
    global _launch
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield
        return
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in COMMANDS:
        _refuse(f"only {' and '.join(COMMANDS)} run on several processes, not {command or 'no command'}: "
                "run the others without torchrun")
    if "--compile" in argv:
        _refuse("--compile does not run under context parallelism yet: run without it under torchrun")
    from hetcache import parallel

    # diffusers 0.42.1's output gather calls a torch function that warns of its own deprecation on every run
    warnings.filterwarnings("ignore", message=".*all_gather_tensor` is deprecated", category=FutureWarning)
    info = parallel.init_process_group()
    _launch = _Launch(info.rank, info.device)
    quiet = info.rank != 0
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(contextlib.redirect_stderr(_ErrorLines(info.rank, sys.stderr)))
        try:
            yield
        except SystemExit as done:
            if done.code not in (0, None):
                raise
            _finish()
            raise
        _finish()


def _refuse(message: str) -> None:
    """End every process of the launch before it joins the group; rank 0 says why."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def _finish() -> None:
    """After a command that succeeded on this rank: rank 0 prints the summary; all ranks leave together."""
    import torch.distributed as dist

    from hetcache import comm, parallel

    for name, transformer in _launch.transformers:
        group = parallel.ulysses_group(transformer)
        ranks = _gather_figures(group.ledger.figures())
        if is_main():
            lines = comm.summary(group.degree, ranks)
            label = f"parallel {name}: " if len(_launch.transformers) > 1 else "parallel "
            print(label + lines[0])
            print("\n".join(f"         {line}" for line in lines[1:]))
    dist.barrier()
    dist.destroy_process_group()
    # Everything is written and the group is left: end here. At interpreter finalization, threads of the CPU
    # (gloo) backend have aborted a rank now and then ("terminate called without an active exception") after a
    # run that succeeded, turning its exit status into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _gather_figures(figures: list[int]) -> list[list[int]]:
    """Every rank's `figures` (the same length everywhere), in rank order."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(figures, dtype=torch.int64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [part.tolist() for part in parts]


class _ErrorLines(io.TextIOBase):
    """stderr of a rank other than 0: its `error:` lines go through, marked with the rank; progress bars, notes and
    warnings (which rank 0 prints too) do not."""

    def __init__(self, rank: int, stream: Any) -> None:
        self.rank, self.stream = rank, stream

    encoding, errors = "utf-8", "strict"  # click writes to a text stream with these as it is (else to its buffer)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        for line in text.splitlines():
            if line.startswith("error:"):
                self.stream.write(f"rank {self.rank}: {line}\n")
        return len(text)


def parallelize(pipe: Any) -> Any:
    """Split the transformer(s) of a loaded pipeline over the launch's processes (nothing without a launch)."""
    if _launch is None:
        return pipe
    from hetcache import parallel

    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        device = transformer.device
        if device.type == "cuda" and device != _launch.device:
            raise UserError(f"under torchrun each process computes on its own GPU ({_launch.device} here), not "
                            f"{device}: pass --device auto or cuda")
        parallel.enable_context_parallel(transformer)
        _launch.transformers.append((name, transformer))
    return pipe


def from_main(read: Callable[[], Any]) -> Any:
    """The prepared inputs `read()` returns (`video.PreparedInputs`), read on rank 0 only and sent to the other
    ranks. A UserError of `read()` ends every rank: rank 0 raises it, the others exit with its exit code."""
    if _launch is None:
        return read()
    import numpy as np
    import torch
    import torch.distributed as dist

    from hetcache.video import PreparedInputs

    prepared, failure = None, ""
    if _launch.rank == 0:
        try:
            prepared = read()
        except UserError as error:
            failure = str(error)
    failure = _broadcast_text(failure)
    if failure and _launch.rank == 0:
        raise UserError(failure)
    if failure:  # rank 0 prints the message
        sys.exit(USER_ERROR_EXIT)
    header = torch.zeros(4, dtype=torch.float64)
    if prepared is not None:
        header[:] = torch.tensor([*prepared.mask.shape, prepared.fps], dtype=torch.float64)
    dist.broadcast(header, src=0)
    frames, height, width = (int(v) for v in header[:3])
    if prepared is not None:
        video = torch.from_numpy(np.ascontiguousarray(prepared.video))
        mask = torch.from_numpy(prepared.mask.astype(np.uint8))
    else:
        video = torch.empty(frames, height, width, 3, dtype=torch.uint8)
        mask = torch.empty(frames, height, width, dtype=torch.uint8)
    dist.broadcast(video, src=0)
    dist.broadcast(mask, src=0)
    if prepared is not None:
        return prepared
    return PreparedInputs(video=video.numpy(), mask=mask.numpy().astype(bool), fps=float(header[3]))


def _broadcast_text(text: str) -> str:
    """Rank 0's `text` on every rank."""
    import torch
    import torch.distributed as dist

    data = text.encode()
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if _launch.rank != 0:
        buffer = torch.empty(int(size), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buffer, src=0)
    return bytes(buffer.tolist()).decode()
