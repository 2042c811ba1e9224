"""Atomic output files, leftovers of killed writers, and output-folder checks (hetcache.files)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetcache import files
from hetcache.errors import UserError


def parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_part(tmp_path):
    target = tmp_path / "results.json"
    files.write_text(target, '{"old": true}\n')
    with (pytest.raises(UserError, match=r"^cannot write .*results.json: disk full: ") as caught,
          files.atomic_path(target) as temp):
        temp.write_bytes(b'{"new": ')  # the first 4 KiB went out, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(caught.value)
    assert target.read_text() == '{"old": true}\n'
    assert parts(tmp_path) == []


@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "the file system is read-only"),
                                              (errno.EACCES, "permission denied"), (errno.EDQUOT, "disk full")])
def test_write_errors_name_the_path_and_the_reason(tmp_path, code, reason):
    error = files.write_error(tmp_path / "x.mp4", OSError(code, os.strerror(code)))
    assert str(error).startswith(f"cannot write {tmp_path / 'x.mp4'}: {reason}: ")


def test_a_killed_writer_leaves_a_part_that_the_next_write_of_that_file_removes(tmp_path):
    target = tmp_path / "per_item.json"
    script = ("import sys, time\nfrom hetcache import files\n"
              f"with files.atomic_path({str(target)!r}) as temp:\n"
              "    temp.write_bytes(b'half')\n    print(temp, flush=True)\n    time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    left = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    assert left.is_file() and files.is_stale(left)
    files.write_text(target, "whole\n")
    assert target.read_text() == "whole\n" and parts(tmp_path) == []


def test_remove_stale_keeps_the_parts_of_running_processes_and_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        stale = [tmp_path / f".a.mp4.{dead}-0123abcd.part", tmp_path / ".b.json.89abcdef.part",
                 tmp_path / "sub" / f".c.npy.{dead}-00000000.part"]
        kept = [tmp_path / f".d.json.{sleeper.pid}-0123abcd.part", tmp_path / f".e.json.{os.getpid()}-0123abcd.part",
                tmp_path / "notes.part", tmp_path / ".f.json.part"]
        for path in stale + kept:
            path.write_text("x")
        assert sorted(files.remove_stale(tmp_path)) == sorted(stale[:2])
        assert sorted(files.remove_stale(tmp_path, recursive=True)) == [stale[2]]
        assert all(path.exists() for path in kept) and not any(path.exists() for path in stale)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_check_writable_finds_a_file_in_the_way_and_makes_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"cannot be made: .*file is a file"):
        files.check_writable(tmp_path / "file" / "out")
    files.check_writable(tmp_path / "new" / "deeper")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_writable_says_disk_full_when_no_space_is_left(tmp_path, monkeypatch):
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 3, real.f_frsize

    monkeypatch.setattr(files.os, "statvfs", lambda path: Full)
    with pytest.raises(UserError, match=r"cannot write .*: disk full: "):
        files.check_writable(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_name_names_the_process_and_stays_beside_the_target(tmp_path):
    temp = files.temporary_path(tmp_path / "out.mp4")
    assert temp.parent == tmp_path and temp.name.startswith(f".out.mp4.{os.getpid()}-")
    assert temp.name.endswith(".part") and not files.is_stale(temp)  # this process is running
