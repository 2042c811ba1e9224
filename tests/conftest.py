"""Shared fixtures: the tiny offline pipeline and a small synthetic clip on disk.

Imports happen inside the fixtures so that test files which need neither do not pay for loading diffusers.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spinning threads make them
    tens of times slower while other tests run. Modules opt in with `pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny random WanVACEPipeline for the session (float32, CPU); tests must not modify it."""
    from hetcache.pipeline import build_tiny_random_pipeline

    return build_tiny_random_pipeline()


@pytest.fixture
def clip_files(tmp_path: Path) -> tuple[Path, Path]:
    """A 9-frame 64x32 (WxH) road clip and its moving mask, written losslessly as clip.mp4 and mask.mp4."""
    from tiny_models import demo_clip
    from hetcache.video import write_mask_video, write_video

    video, mask = demo_clip(frames=9, height=32, width=64)
    return (
        write_video(tmp_path / "clip.mp4", video, 8.0, lossless=True),
        write_mask_video(tmp_path / "mask.mp4", mask, 8.0, lossless=True),
    )
