"""`torchrun --nproc-per-node 2 -m hetcache edit ...` on the CPU (gloo): the file one process writes, read and
written by rank 0 only, one summary with the per-rank figures; commands that do not run on several processes are
refused.

Tolerance: none on this path. With the same thread count the two runs write the same bytes (torchrun's default is
one thread per process, so the one-process reference runs on one thread too); with other thread counts PyTorch's
CPU kernels may round differently (1 level of 255 on the acceptance clip's frames, docs/PARALLEL.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tiny_models import demo_clip
from typer.testing import CliRunner

from hetcache.cli import app
from hetcache.video import write_mask_video, write_video

SRC = Path(__file__).resolve().parents[1] / "src"
# `python -m hetcache` from a folder of its own per rank (rank0/, rank1/): what a rank reads or writes is seen there
PER_RANK_FOLDER = """\
import os, runpy, sys
os.chdir(f"rank{os.environ['RANK']}")
sys.argv[0] = "hetcache"
runpy.run_module("hetcache", run_name="__main__", alter_sys=True)
"""

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.usefixtures("one_thread"),
]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python *command` in its own process group, which is killed whole if it outlives the timeout (torchrun's
    workers included)."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    with subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _torchrun(processes: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]


def test_torchrun_edit_writes_what_one_process_writes_from_rank_0_only(tmp_path):
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    rank0.mkdir(), rank1.mkdir()
    video, mask = demo_clip(frames=9, height=64, width=128)
    write_video(rank0 / "clip.mp4", video, 8.0, lossless=True)
    write_mask_video(rank0 / "mask.mp4", mask, 8.0, lossless=True)
    (tmp_path / "per_rank.py").write_text(PER_RANK_FOLDER)
    args = ["edit", "clip.mp4", "--mask", "mask.mp4", "--prompt", "an empty road", "--model", "tiny-random",
            "--steps", "12", "--method", "hetcache-fast", "--method-option", "hetcache-fast.max_reuse=3", "--lossless",
            "--no-side-by-side"]  # REUSE allowed, so that every step kind runs under torchrun

    two = _run([*_torchrun(2), "per_rank.py", *args, "-o", "two.mp4"], tmp_path)
    os.chdir(rank0)  # pytest's monkeypatch would restore it; the tmp folder is removed with the test's
    try:
        one = CliRunner().invoke(app, [*args, "-o", "one.mp4"])
    finally:
        os.chdir(tmp_path)
    assert one.exit_code == 0, one.output
    assert two.returncode == 0, two.stderr[-3000:]
    assert (rank0 / "two.mp4").read_bytes() == (rank0 / "one.mp4").read_bytes()
    assert list(rank1.iterdir()) == []  # rank 1 read nothing there (no inputs were there) and wrote nothing

    lines = two.stdout.splitlines()
    assert sum(line.startswith("output   ") for line in lines) == 1  # rank 1 prints nothing
    method = next(line for line in lines if line.startswith("method"))
    assert method == next(line for line in one.output.splitlines() if line.startswith("method"))
    assert set(re.search(r"plan ([FPR]+) ", method).group(1)) == set("FPR")
    start = next(i for i, line in enumerate(lines) if line.startswith("parallel "))
    summary = lines[start:]
    assert re.fullmatch(r"parallel 2 processes \(Ulysses\); HetCache cache in one process (\d+\.\d\d) MiB, of "
                        r"which text K/V (\d+\.\d\d) MiB \(kept whole on every rank, the rest split\)", summary[0])
    whole, text = (float(v) for v in re.findall(r"(\d+\.\d\d) MiB", summary[0]))
    assert len(summary) == 3
    for rank, line in enumerate(summary[1:]):
        match = re.fullmatch(rf"         rank {rank}: received per call F (\S+) MiB \((\d+) calls\), P (\S+) MiB "
                             r"\((\d+) calls\), R (\S+) MiB \((\d+) calls\); HetCache cache (\S+) MiB", line)
        assert match, line
        f_size, _, p_size, _, r_size, _, cache = (float(v) for v in match.groups())
        assert f_size > p_size > r_size > 0  # a PARTIAL step moves fewer rows than a FULL one; REUSE only the output
        assert abs(cache - ((whole - text) / 2 + text)) <= 0.01  # the rest split over the ranks (MiB rounding)
    assert "parallel" not in one.output


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "--model", "tiny-random"],
     "error: only edit and bench run on several processes, not plan: run the others without torchrun"),
    (["bench", "clip.mp4", "--box", "0,0,16,16", "--prompt", "a road", "--out", "b", "--compile"],
     "error: --compile does not run under context parallelism yet: run without it under torchrun"),
])
def test_what_does_not_run_on_several_processes_is_refused(args, message, tmp_path):
    result = _run([*_torchrun(2), "-m", "hetcache", *args], tmp_path)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [message]  # rank 0 says it
    assert list(tmp_path.iterdir()) == []

