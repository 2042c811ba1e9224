"""What every command promises about files: it never replaces an input, finds an unwritable or full output folder
before any model loads, writes each file whole or not at all, cleans up after killed runs, and ends bad input
(truncated video, non-finite guidance or output, an unknown container, a size too large, an empty mask) with one
`error:` line, exit 2, and no new or changed file."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from hetcache import files
from hetcache.cli import app
from hetcache.runner import timing_note
from hetcache.video import prepare_inputs, read_frames, write_mask_video

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--model", "tiny-random", "--steps", "2", "--device", "cpu"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONDONTWRITEBYTECODE": "1"}
CLI = [sys.executable, "-c", "from hetcache.cli import main; main()"]

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr, result.stderr


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_model(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading a model."""
    from hetcache import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "build_tiny_random_pipeline", refuse)


@pytest.fixture
def dataset(clip_files, tmp_path) -> Path:
    item = tmp_path / "data" / "clip0"
    item.mkdir(parents=True)
    for name, path in (("video.mp4", clip_files[0]), ("mask.mp4", clip_files[1])):
        shutil.copyfile(path, item / name)
    (item / "prompt.txt").write_text("an empty road\n")
    return tmp_path / "data"


def commands(clip_files, dataset: Path, out: Path) -> dict[str, list]:
    """One good invocation of every command that writes, its output under `out`."""
    video, mask = clip_files
    edit_args = [video, "--mask", mask, "-p", "a road"]
    return {
        "edit": ["edit", *edit_args, "-o", out / "o.mp4", *TINY],
        "bench": ["bench", *edit_args, "--methods", "full", "--out", out, *TINY],
        "sweep": ["sweep", *edit_args, "--methods", "fewer-steps", "--out", out, *TINY],
        "analyze": ["analyze", *edit_args, "--out", out, *TINY],
        "eval": ["eval", "--dataset", dataset, "--methods", "full", "--out", out, *TINY],
        "demo": ["demo", "--out", out, *TINY],
        "calibrate": ["calibrate", *edit_args, "--search", "quick", "--target", "flops=1", "--out", out, *TINY],
    }


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("option", ["-o", "--side-by-side"])
@pytest.mark.parametrize("role", ["video", "mask"])
def test_edit_never_writes_over_its_input_or_mask(clip_files, tmp_path, monkeypatch, option, role):
    no_model(monkeypatch)
    video, mask = clip_files
    target = {"video": video, "mask": mask}[role]
    before = snapshot(tmp_path)
    args = ["edit", f"./{video.name}" if role == "video" else video, "--mask", mask, "-p", "x", *TINY]
    args += ["-o", target] if option == "-o" else ["-o", tmp_path / "o.mp4", "--side-by-side", target]
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke(*args), f"is the {'input video' if role == 'video' else 'mask'}")
    assert snapshot(tmp_path) == before


def test_bench_never_writes_over_its_input(clip_files, tmp_path, monkeypatch):
    no_model(monkeypatch)
    out = tmp_path / "bench"
    out.mkdir()
    video = shutil.copyfile(clip_files[0], out / "side_by_side.mp4")
    before = snapshot(tmp_path)
    result = invoke("bench", video, "--mask", clip_files[1], "-p", "x", "--out", out, *TINY)
    assert_user_error(result, "is the input video")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ items 2-4
@pytest.mark.parametrize("command", ["edit", "bench", "sweep", "analyze", "eval", "demo", "calibrate"])
def test_a_full_disk_is_found_before_any_model_loads(command, clip_files, dataset, tmp_path, monkeypatch):
    no_model(monkeypatch)
    real = os.statvfs

    class Full:
        f_bavail, f_frsize = 0, real(tmp_path).f_frsize

    monkeypatch.setattr(files.os, "statvfs", lambda path: Full)
    before = snapshot(tmp_path)
    assert_user_error(invoke(*commands(clip_files, dataset, tmp_path / "out")[command]), ": disk full: ")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


class _FillsUp:
    """A file handle on a disk that fills up after `room` bytes: later writes fail with ENOSPC. No fileno, so
    that writers (PIL) cannot go around it."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        data = data if isinstance(data, (str, bytes)) else bytes(data)
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._handle.write(data)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def _disk_fills_up_writing(monkeypatch, name: str, room: int) -> None:
    """Every write of a file named `name` (or of its temporary file) meets a full disk after `room` bytes,
    whichever library opens it (pathlib, matplotlib, PIL)."""
    real = io.open

    def opening(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        if "w" in mode and isinstance(file, (str, os.PathLike)) and (Path(file).name == name or Path(file).name.startswith(f".{name}.")):
            return _FillsUp(handle, room)
        return handle

    monkeypatch.setattr(io, "open", opening)
    monkeypatch.setattr("builtins.open", opening)


@pytest.mark.parametrize(("command", "name"), [
    ("bench", "results.json"), ("bench", "results.csv"), ("bench", "results.md"), ("bench", "pareto.png"),
    ("analyze", "analysis.json"), ("analyze", "analysis.png"), ("analyze", "mass_by_class.png"),
])
def test_a_disk_that_fills_up_while_writing_leaves_no_cut_file(command, name, clip_files, dataset, tmp_path,
                                                               monkeypatch):
    """Item 2: results and figures of bench and analyze are written whole or not at all."""
    out = tmp_path / "out"
    room = 0 if name == "results.csv" else 64  # the empty results.csv, and files cut short
    _disk_fills_up_writing(monkeypatch, name, room)
    result = invoke(*commands(clip_files, dataset, out)[command])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (f"error: cannot write {out / name}: disk full: free some space or "
                                              "write to another disk"), result.stderr
    assert "Traceback" not in result.output
    assert not (out / name).exists() and not list(out.rglob("*.part"))
    for path in out.glob("*.json"):  # what was written before the disk filled up is whole
        json.loads(path.read_text())


def _limited(size: int):
    def start() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return start


def test_a_write_cut_short_by_the_system_ends_in_one_line_and_no_part(clip_files, tmp_path):
    """A real failure inside PyAV and matplotlib: files larger than 20 kB cannot be written."""
    out = tmp_path / "bench"
    done = subprocess.run([*CLI, "bench", clip_files[0], "--mask", clip_files[1], "-p", "x", "--methods", "full",
                           "--out", out, *TINY], capture_output=True, text=True, env=ENV, timeout=600,
                          preexec_fn=_limited(20_000), check=False)
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}/") and "larger than this process may write" in last
    assert "Traceback" not in done.stderr
    assert not list(out.glob(".*.part"))
    for name in ("results.json", "pareto.png", "side_by_side.mp4"):  # each whole, or absent
        path = out / name
        if path.suffix == ".json" and path.exists():
            json.loads(path.read_text())
    assert not (out / "side_by_side.mp4").exists() or read_frames(out / "side_by_side.mp4").frames.size


def _killed_while_writing(target: Path) -> Path:
    """The temporary file a process left when it was killed (SIGKILL) while writing `target`."""
    code = ("import os, signal, sys\nfrom hetcache import files\n"
            "with files.atomic_path(sys.argv[1]) as temp:\n"
            "    temp.write_bytes(b'cut')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=ENV, capture_output=True, timeout=120,
                          check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = target.parent.glob(f".{target.name}.*.part")
    return left


# (command, where it writes: the leftovers' targets, relative to its output folder)
KILLED = [("edit", ["o.mp4"]), ("bench", ["results.json", "pareto.png"]), ("analyze", ["analysis.json"]),
          ("sweep", ["results.json", "runs/clip/old-0123456789.json"]),
          ("eval", ["aggregate.json", "items/clip0/result.json"]), ("calibrate", ["front.json", "search/results.json"])]


@pytest.mark.parametrize(("command", "targets"), KILLED, ids=[c for c, _ in KILLED])
def test_leftovers_of_a_killed_writer_are_removed_by_the_next_run(command, targets, clip_files, dataset,
                                                                   tmp_path):
    """Item 4: a process killed during a write leaves `.NAME.<pid>-<hex>.part`; the next run removes it."""
    out = tmp_path / "out"
    left = [_killed_while_writing(out / target) for target in targets]
    alive = out / f".{Path(targets[0]).name}.{os.getpid()}-89abcdef.part"  # a writer still running: kept
    alive.write_bytes(b"busy")
    result = invoke(*commands(clip_files, dataset, out)[command])
    assert result.exit_code == 0, result.output
    assert not any(path.exists() for path in left) and alive.exists()
    if command != "edit":  # the folder commands say what they removed; edit removes its own file's leftovers
        count = f"{len(left)} temporary file{'s' * (len(left) > 1)}"
        assert f"note: removed {count} that an interrupted run left in {out}" in result.stderr


def _private_tmpfs_works() -> bool:
    try:
        done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run_on_tmpfs(tmp_path: Path, args: list, *, full: bool = False, read_only: bool = False):
    """Run the CLI with a small tmpfs mounted at tmp_path/disk in a private mount namespace (full or read-only);
    returns the process and what the disk held afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    listing = tmp_path / "listing"
    script = f"mount -t tmpfs -o size=1m tmpfs {disk} || exit 99\n"
    if full:
        script += f"dd if=/dev/zero of={disk}/fill bs=4096 2>/dev/null\n"
    if read_only:
        script += f"mount -o remount,ro {disk} || exit 99\n"
    script += '"$@"; code=$?\n' + f"ls -A {disk} > {listing}\nexit $code\n"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *CLI, *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600, check=False)
    return done, listing.read_text().split()


@pytest.mark.skipif(not _private_tmpfs_works(), reason="needs a private tmpfs (unshare -rm)")
@pytest.mark.parametrize(("command", "disk"), [("edit", "full"), ("bench", "read-only"), ("eval", "read-only"),
                                               ("analyze", "full"), ("sweep", "read-only"), ("demo", "read-only")])
def test_real_full_and_read_only_disks(command, disk, clip_files, dataset, tmp_path):
    args = commands(clip_files, dataset, tmp_path / "disk" / "out")[command]
    done, held = run_on_tmpfs(tmp_path, args, full=disk == "full", read_only=disk == "read-only")
    assert done.returncode == 2, done.stderr
    expected = "disk full" if disk == "full" else "the file system is read-only"
    assert done.stderr.splitlines()[-1].startswith("error: cannot write ") and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "denoising" not in done.stderr
    assert held == (["fill"] if disk == "full" else [])


# ------------------------------------------------------------------------------------------------ item 12
class _RunsCode:
    """A pickle whose loading would run code: it creates a file (the issue's crafted file ran a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


@pytest.mark.parametrize(("command", "option"), [("bench", "--lpips-weights"), ("sweep", "--lpips-weights"),
                                                 ("eval", "--lpips-weights"), ("eval", "--i3d-weights")])
def test_weights_that_would_run_code_are_refused_before_any_model_loads(command, option, clip_files, dataset,
                                                                         tmp_path, monkeypatch):
    import torch

    no_model(monkeypatch)
    marker, crafted = tmp_path / "code-ran", tmp_path / "crafted.pt"
    torch.save({"weight": _RunsCode(marker)}, crafted)
    before = snapshot(tmp_path)
    result = invoke(*commands(clip_files, dataset, tmp_path / "out")[command], option, crafted)
    assert_user_error(result, f"{crafted} is not a")
    assert "state dict" in result.stderr and not marker.exists()
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--lpips-weights", "--i3d-weights"])
def test_torchscript_weights_are_refused_and_not_run(option, clip_files, dataset, tmp_path, monkeypatch):
    """TorchScript would run the file's code: there is no flag that loads it."""
    import torch

    no_model(monkeypatch)
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    result = invoke(*commands(clip_files, dataset, tmp_path / "out")["eval"], option, script)
    assert_user_error(result, f"{script} is a TorchScript file, not a")


# ------------------------------------------------------------------------------------------------ items 6-9
def test_a_truncated_video_says_so(clip_files, tmp_path, monkeypatch):
    no_model(monkeypatch)
    frames = np.random.default_rng(0).integers(0, 256, (41, 32, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = invoke("edit", cut, "--box", "0,0,8,8", "-p", "x", "-o", tmp_path / "o.mp4", "--frames", "33", *TINY)
    assert_user_error(result, "is truncated: its index lists 41 frames")
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("command", ["edit", "bench", "sweep", "analyze", "eval", "demo", "calibrate"])
def test_non_finite_guidance_is_refused(command, value, clip_files, dataset, tmp_path, monkeypatch):
    no_model(monkeypatch)
    before = snapshot(tmp_path)
    args = commands(clip_files, dataset, tmp_path / "out")[command]
    assert_user_error(invoke(*args, "--guidance", value), f"--guidance {value} is not a finite number")
    assert snapshot(tmp_path) == before


def test_a_model_output_that_is_not_finite_writes_nothing(clip_files, tmp_path, monkeypatch):
    from diffusers import WanVACETransformer3DModel

    forward = WanVACETransformer3DModel.forward

    def overflowing(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out[0].fill_(float("inf"))
        return out

    monkeypatch.setattr(WanVACETransformer3DModel, "forward", overflowing)
    video, mask = clip_files
    result = invoke("edit", video, "--mask", mask, "-p", "x", "-o", tmp_path / "o.mp4", *TINY)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith(
        "error: the latents after step 1 of 2 hold NaN or inf values"), result.stderr
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o_side_by_side.mp4").exists()


@pytest.mark.parametrize(("name", "expected"), [("o.avi", "ends in '.avi'"), ("o", "has no extension"),
                                                ("o.webm", "ends in '.webm'")])
def test_edit_output_must_name_a_container_it_writes(name, expected, clip_files, tmp_path, monkeypatch):
    no_model(monkeypatch)
    before = snapshot(tmp_path)
    assert_user_error(invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / name, *TINY),
                      expected)
    assert_user_error(invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mp4",
                             "--side-by-side", tmp_path / name, *TINY), expected)
    assert snapshot(tmp_path) == before


def test_edit_writes_the_container_its_suffix_names(clip_files, tmp_path):
    result = invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mkv",
                    "--side-by-side", tmp_path / "s.mov", *TINY)
    assert result.exit_code == 0, result.output
    with av.open(str(tmp_path / "o.mkv")) as container:
        assert container.format.name.startswith("matroska")
    assert read_frames(tmp_path / "s.mov").frames.shape == (9, 32, 192, 3)


def test_a_still_image_is_described_and_written_at_the_rate_it_is_used(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((32, 64, 3), 90, dtype=np.uint8)).save(tmp_path / "still.png")
    result = invoke("edit", tmp_path / "still.png", "--box", "8,8,40,24", "-p", "x", "-o", tmp_path / "o.mp4",
                    "--no-side-by-side", *TINY)
    assert result.exit_code == 0, result.output
    assert f"input    {tmp_path / 'still.png'} (64x32 image, one frame at 16 fps) -> 64x32 x 1 frames at 16 fps" \
        in result.stdout
    assert read_frames(tmp_path / "o.mp4").fps == 16.0


@pytest.mark.skipif(not (SHARED_DATA / "driving.mp4").exists(), reason="needs the shared driving clip")
def test_edit_says_that_the_audio_is_not_copied(tmp_path):
    result = invoke("edit", SHARED_DATA / "driving.mp4", "--box", "100,100,300,300", "-p", "x", "-o",
                    tmp_path / "o.mp4", "--frames", "5", "--height", "64", "--width", "112", "--no-side-by-side",
                    *TINY)
    assert result.exit_code == 0, result.output
    assert "has an audio track, which is not copied: the output is video only" in result.stderr
    with av.open(str(tmp_path / "o.mp4")) as container:
        assert not container.streams.audio


@pytest.mark.parametrize("command", ["edit", "bench", "sweep", "analyze"])
def test_sizes_above_the_models_limit_end_before_anything_is_resized(command, clip_files, dataset, tmp_path,
                                                                      monkeypatch):
    no_model(monkeypatch)
    from hetcache import video

    monkeypatch.setattr(video, "fit_frames", lambda *a, **k: pytest.fail("resized"))
    args = commands(clip_files, dataset, tmp_path / "out")[command]
    assert_user_error(invoke(*args, "--height", "16000"), "pixels per frame, more than the 2,088,960 this model")


def test_a_model_folder_with_a_wrong_config_type_is_one_line(clip_files, tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "model")
    config = tmp_path / "model" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": "three"}))
    result = invoke("edit", clip_files[0], "--mask", clip_files[1], "-p", "x", "-o", tmp_path / "o.mp4",
                    "--model", tmp_path / "model", "--steps", "1", "--device", "cpu")
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: could not load the pipeline")
    assert "check the values in its config.json files" in result.stderr and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ item 13
def test_an_empty_mask_writes_the_input_through_without_a_model(clip_files, tmp_path, monkeypatch):
    no_model(monkeypatch)
    video = clip_files[0]
    empty = write_mask_video(tmp_path / "empty.mp4", np.zeros((9, 32, 64), dtype=bool), 8.0, lossless=True)
    result = invoke("edit", video, "--mask", empty, "-p", "x", "-o", tmp_path / "o.mp4", "--lossless", *TINY)
    assert result.exit_code == 0, result.output
    assert "method   none: the mask is empty, so there is nothing to edit (no model loaded)" in result.stdout
    np.testing.assert_array_equal(read_frames(tmp_path / "o.mp4").frames, prepare_inputs(video, empty).video)
    assert (tmp_path / "o_side_by_side.mp4").is_file()


@pytest.mark.parametrize(("command", "purpose"), [("bench", "compare"), ("sweep", "sweep"), ("analyze", "analyse")])
def test_commands_that_compare_refuse_an_empty_mask(command, purpose, clip_files, dataset, tmp_path, monkeypatch):
    no_model(monkeypatch)
    empty = write_mask_video(tmp_path / "empty.mp4", np.zeros((9, 32, 64), dtype=bool), 8.0, lossless=True)
    args = [str(a) for a in commands(clip_files, dataset, tmp_path / "out")[command]]
    args[args.index("--mask") + 1] = str(empty)
    before = snapshot(tmp_path)
    assert_user_error(invoke(*args), f"the mask is empty: nothing to {purpose}")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ item 14
def test_a_speedup_above_the_analytic_bound_carries_a_note():
    assert timing_note(1.9, 0.5) is None  # within noise of 2x
    assert timing_note(None, 0.5) is None and timing_note(3.0, None) is None
    note = timing_note(17.97, 0.95)
    assert note.startswith("measured speedup 17.97x is above the analytic 1.05x by more than timing noise")


def test_bench_warns_when_a_speedup_exceeds_its_analytic_bound(clip_files, tmp_path, monkeypatch):
    from hetcache import bench

    real = bench.run_method

    def busy_reference(pipe, config, *args, **kwargs):
        done = real(pipe, config, *args, **kwargs)
        if type(config).__name__ != "FullConfig":
            done.denoise_s /= 50  # as if full had run on a loaded machine
        return done

    monkeypatch.setattr(bench, "run_method", busy_reference)
    out = tmp_path / "bench"
    result = invoke("bench", clip_files[0], "--mask", clip_files[1], "-p", "x", "--methods", "full,fewer-steps",
                    "--out", out, *TINY[:2], "--steps", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "warning: fewer-steps: measured speedup" in result.stderr
    record = json.loads((out / "results.json").read_text())["methods"][1]
    assert record["name"] == "fewer-steps" and "above the analytic 2.00x" in record["notes"][-1]
    report = (out / "results.md").read_text()
    assert "Timings on a CPU swing several-fold" in report and "above the analytic 2.00x" in report
