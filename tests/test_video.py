"""Video and mask I/O: exact round trips, sizing rules, frame sampling, mask handling and every bad input."""

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from hetcache import video as V
from hetcache.errors import UserError
from hetcache.video import (
    choose_frame_count,
    composite,
    default_size,
    fit_frames,
    frame_indices,
    mask_overlay,
    prepare_inputs,
    read_frames,
    side_by_side,
    write_mask_video,
    write_video,
)

RNG = np.random.default_rng(0)
DRIVING = Path("/work/shared/data/driving.mp4")
DRIVING_MASK = Path("/work/shared/data/driving_mask.mp4")


def random_frames(count: int, height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def rect_masks(count: int, height: int, width: int, scale: int = 1) -> np.ndarray:
    """A rectangle that moves one step right per frame (so frames are told apart), drawn at `scale`."""
    mask = np.zeros((count, height * scale, width * scale), dtype=bool)
    for t in range(count):
        mask[t, 4 * scale : 20 * scale, (2 + t) * scale : (14 + t) * scale] = True
    return mask


def save_mask_video(path: Path, mask: np.ndarray) -> Path:
    return write_mask_video(path, mask, 16, lossless=True)


@pytest.fixture
def clip9(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """9 random frames of 32x48 (a size default_size keeps as is), written losslessly."""
    frames = random_frames(9, 32, 48)
    return write_video(tmp_path / "clip.mp4", frames, 16, lossless=True), frames


# ------------------------------------------------------------------------------------------------ writing


def test_lossless_round_trip_is_exact_and_keeps_fractional_fps(tmp_path):
    frames = random_frames(5, 32, 48)
    path = write_video(tmp_path / "new" / "dir" / "x.mp4", frames, 7.5, lossless=True)
    clip = read_frames(path)
    assert clip.frames.dtype == np.uint8
    np.testing.assert_array_equal(clip.frames, frames)
    assert clip.fps == 7.5
    assert clip.source == str(path)
    assert os.listdir(path.parent) == ["x.mp4"]


def test_lossy_write_reads_back_count_size_and_ntsc_rate(tmp_path):
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    frames = np.stack([np.stack([np.roll(ramp, t)[None].repeat(48, 0)] * 3, axis=-1) for t in range(6)])
    path = write_video(tmp_path / "x.mp4", frames, float(Fraction(30000, 1001)))
    clip = read_frames(path)
    assert clip.frames.shape == (6, 48, 64, 3)
    assert clip.fps == pytest.approx(30000 / 1001, abs=1e-4)
    assert np.abs(clip.frames.astype(int) - frames).mean() < 8


def test_write_mask_video_round_trip(tmp_path):
    mask = rect_masks(5, 32, 48)
    clip = read_frames(save_mask_video(tmp_path / "m.mp4", mask))
    np.testing.assert_array_equal(clip.frames.mean(-1) > 127, mask)
    assert set(np.unique(clip.frames)) == {0, 255}


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = write_video(tmp_path / "out.mp4", random_frames(3, 32, 32), 16)
    before = path.read_bytes()
    calls = []

    def failing_frame(frame):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("encoder died")
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")

    monkeypatch.setattr(V, "_video_frame", failing_frame)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(path, random_frames(5, 32, 32), 16)
    calls.clear()
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(tmp_path / "fresh.mp4", random_frames(5, 32, 32), 16)
    assert os.listdir(tmp_path) == ["out.mp4"]
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------------ reading


def test_image_folder_sorted_by_name_at_16_fps(tmp_path):
    frames = random_frames(11, 16, 24)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    clip = read_frames(tmp_path)
    np.testing.assert_array_equal(clip.frames, frames)  # frame2 before frame10
    assert clip.fps == 16


def test_single_image_is_one_frame(tmp_path):
    frame = random_frames(1, 20, 30)[0]
    Image.fromarray(frame).save(tmp_path / "still.png")
    clip = read_frames(tmp_path / "still.png")
    np.testing.assert_array_equal(clip.frames, frame[None])


def test_gif_reads_every_frame(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (32, 16), c) for c in colours]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    clip = read_frames(tmp_path / "a.gif")
    assert clip.frames.shape == (3, 16, 32, 3)
    np.testing.assert_array_equal(clip.frames[:, 8, 16], colours)


def test_bad_video_inputs_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_frames(tmp_path / "missing.mp4")
    (tmp_path / "x.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(UserError, match="x.mp4"):
        read_frames(tmp_path / "x.mp4")
    with av.open(str(tmp_path / "empty.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    with pytest.raises(UserError, match="empty.mp4"):
        read_frames(tmp_path / "empty.mp4")
    (tmp_path / "frames").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_frames(tmp_path / "frames")
    (tmp_path / "frames" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images"):
        read_frames(tmp_path / "frames")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        read_frames(tmp_path / "broken.png")


def test_folder_of_mixed_sizes_raises_user_error(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "0.png")
    Image.new("RGB", (32, 16)).save(tmp_path / "1.png")
    with pytest.raises(UserError, match="same size"):
        read_frames(tmp_path)


# ------------------------------------------------------------------------------------------------ sizes


def test_default_size_for_480p_landscape_and_portrait():
    assert default_size(480, 854) == (480, 832)
    assert default_size(854, 480) == (832, 480)
    assert default_size(1080, 1920) == (480, 832)
    assert default_size(1024, 1024) == (624, 624)


@pytest.mark.parametrize("height, width", [(60, 100), (10, 10), (256, 256), (333, 1000), (2000, 500)])
def test_default_size_is_multiple_of_16_within_budget_and_never_enlarges(height, width):
    h, w = default_size(height, width)
    assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
    assert h * w <= max(min(480 * 832, height * width), 256)
    assert abs(np.log((w / h) / (width / height))) < 0.5


def test_fit_crops_the_centre_without_resampling():
    frames = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None], (2, 32, 64, 3)).copy()
    out = fit_frames(frames, 32, 32)
    np.testing.assert_array_equal(out, frames[:, :, 16:48])
    portrait = np.broadcast_to(np.arange(128, dtype=np.uint8)[None, :, None, None], (1, 128, 32, 3)).copy()
    np.testing.assert_array_equal(fit_frames(portrait, 32, 32), portrait[:, 48:80, :])


def test_fit_scales_to_cover_then_crops_the_centre():
    mask = np.zeros((2, 64, 128), dtype=bool)
    mask[:, :, 64:] = True  # right half; the outer quarters are cropped away after halving
    out = fit_frames(mask, 32, 32)
    assert out.dtype == np.bool_ and out.shape == (2, 32, 32)
    assert out[:, :, 16:].all() and not out[:, :, :16].any()
    flat = np.full((3, 40, 80, 3), 77, dtype=np.uint8)
    resized = fit_frames(flat, 48, 64)
    assert resized.shape == (3, 48, 64, 3) and (resized == 77).all()
    assert fit_frames(flat, 48, 64, nearest=True).shape == (3, 48, 64, 3)


@pytest.mark.parametrize("height, width", [(30, 32), (32, 0), (-16, 32), (32, 40)])
def test_fit_rejects_sizes_not_multiple_of_16(height, width):
    with pytest.raises(UserError, match="multiple of 16"):
        fit_frames(np.zeros((1, 32, 32, 3), dtype=np.uint8), height, width)


# ------------------------------------------------------------------------------------------------ frames


def test_frame_count_rules():
    assert choose_frame_count(222) == 81
    assert choose_frame_count(10) == 9
    assert choose_frame_count(1) == 1
    assert choose_frame_count(90, stride=2) == 45  # 45 frames span source frames 0..88
    assert choose_frame_count(5, stride=3) == 1
    assert choose_frame_count(200, max_frames=33) == 33
    assert choose_frame_count(17, 9, stride=2) == 9
    assert choose_frame_count(100, 97) == 97  # an explicit request is not capped at 81


@pytest.mark.parametrize(
    "available, requested, stride, message",
    [
        (20, 10, 1, "use 9 or 13"),
        (20, 2, 1, "use 1 or 5"),
        (20, 0, 1, "at least 1"),
        (10, 13, 1, "at most 9 frames"),
        (16, 9, 2, "need 17 source frames"),
        (0, None, 1, "no frames"),
        (10, None, 0, "stride"),
    ],
)
def test_frame_count_errors(available, requested, stride, message):
    with pytest.raises(UserError, match=message):
        choose_frame_count(available, requested, stride)


def test_frame_indices():
    np.testing.assert_array_equal(frame_indices(4, 3, 2), [2, 5, 8, 11])
    np.testing.assert_array_equal(frame_indices(3), [0, 1, 2])


# ------------------------------------------------------------------------------------------------ inputs


def test_prepare_with_mask_video_of_same_size(clip9, tmp_path):
    path, frames = clip9
    mask = rect_masks(9, 32, 48)
    out = prepare_inputs(path, save_mask_video(tmp_path / "m.mp4", mask))
    np.testing.assert_array_equal(out.video, frames)
    np.testing.assert_array_equal(out.mask, mask)
    assert out.fps == 16 and out.notes == []


def test_prepare_samples_video_and_mask_at_the_same_stride(tmp_path):
    frames = random_frames(20, 32, 48)
    path = write_video(tmp_path / "v.mp4", frames, 30, lossless=True)
    mask = rect_masks(20, 32, 48)
    out = prepare_inputs(path, save_mask_video(tmp_path / "m.mp4", mask), stride=2)
    assert out.video.shape == (9, 32, 48, 3)  # 9 frames span 0..16 of 20
    np.testing.assert_array_equal(out.video, frames[0:17:2])
    np.testing.assert_array_equal(out.mask, mask[0:17:2])
    assert out.fps == 15


def test_prepare_with_single_image_mask_broadcasts(clip9, tmp_path):
    path, _ = clip9
    still = np.zeros((32, 48), dtype=np.uint8)
    still[8:24, 16:40] = 255
    Image.fromarray(still).save(tmp_path / "m.png")
    out = prepare_inputs(path, tmp_path / "m.png", frames=5)
    assert out.mask.shape == (5, 32, 48)
    np.testing.assert_array_equal(out.mask, np.broadcast_to(still > 0, (5, 32, 48)))
    assert any("single image" in n for n in out.notes)


def test_prepare_with_box_in_source_pixels(clip9):
    path, _ = clip9
    expected = np.zeros((9, 32, 48), dtype=bool)
    expected[:, 4:20, 8:24] = True
    np.testing.assert_array_equal(prepare_inputs(path, box="8,4,24,20").mask, expected)
    np.testing.assert_array_equal(prepare_inputs(path, box=(8, 4, 24, 20)).mask, expected)
    np.testing.assert_array_equal(prepare_inputs(path, box="0,0,48,32").mask, np.ones((9, 32, 48), bool))


def test_prepare_box_is_fitted_like_the_video(clip9):
    path, _ = clip9
    out = prepare_inputs(path, box="8,4,24,20", height=64)  # width follows the 3:2 aspect
    assert out.video.shape == (9, 64, 96, 3)
    assert out.mask.shape == (9, 64, 96)
    assert out.mask[:, 8:40, 16:48].all() and out.mask.sum() == 9 * 32 * 32


def test_prepare_fits_a_mask_of_another_size_and_says_so(clip9, tmp_path):
    path, _ = clip9
    big = rect_masks(9, 32, 48, scale=2)
    out = prepare_inputs(path, save_mask_video(tmp_path / "m.mp4", big))
    np.testing.assert_array_equal(out.mask, rect_masks(9, 32, 48))
    assert any("96x64" in n and "48x32" in n for n in out.notes)


def test_prepare_repeats_the_last_frame_of_a_short_mask_with_a_warning(tmp_path):
    frames = random_frames(17, 32, 48)
    path = write_video(tmp_path / "v.mp4", frames, 16, lossless=True)
    mask = rect_masks(6, 32, 48)
    with pytest.warns(UserWarning, match="repeated"):
        out = prepare_inputs(path, save_mask_video(tmp_path / "m.mp4", mask), stride=2)
    np.testing.assert_array_equal(out.mask[:3], mask[[0, 2, 4]])
    np.testing.assert_array_equal(out.mask[3:], np.broadcast_to(mask[5], (6, 32, 48)))  # the mask's last frame
    assert any("repeated" in n for n in out.notes)


def test_prepare_cuts_a_longer_mask(clip9, tmp_path):
    path, _ = clip9
    mask = rect_masks(13, 32, 48)
    out = prepare_inputs(path, save_mask_video(tmp_path / "m.mp4", mask))
    np.testing.assert_array_equal(out.mask, mask[:9])


def test_mask_threshold_is_127(clip9, tmp_path):
    path, _ = clip9
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, 0:8] = 127
    image[:, 8:16] = 128
    image[:, 16:24] = (255, 126, 0)  # mean exactly 127
    image[:, 24:32] = (255, 0, 128)  # mean 127.7
    Image.fromarray(image).save(tmp_path / "m.png")
    mask = prepare_inputs(path, tmp_path / "m.png").mask
    expected = np.zeros((32, 48), dtype=bool)
    expected[:, 8:16] = expected[:, 24:32] = True
    np.testing.assert_array_equal(mask, np.broadcast_to(expected, mask.shape))


def test_empty_mask_is_prepared_and_left_to_the_command(clip9, tmp_path):
    """`edit` writes the input through, the commands that compare refuse it (`check_mask_covers`)."""
    path, _ = clip9
    Image.new("L", (48, 32), 0).save(tmp_path / "m.png")
    out = prepare_inputs(path, tmp_path / "m.png")
    assert not out.mask.any()
    with pytest.raises(UserError, match="the mask is empty"):
        V.check_mask_covers(out.mask, "compare")


@pytest.mark.parametrize(
    "box", ["0,0,49,32", "8,4,8,20", "24,4,8,20", "-1,0,8,8", "0,0,8", "a,b,c,d", "1.5,0,8,8", (0, 0, 8, 33)]
)
def test_bad_box_raises_user_error(clip9, box):
    with pytest.raises(UserError, match="box"):
        prepare_inputs(clip9[0], box=box)


def test_bad_prepare_inputs_raise_user_error(clip9, tmp_path):
    path, _ = clip9
    with pytest.raises(UserError, match="exactly one mask"):
        prepare_inputs(path)
    with pytest.raises(UserError, match="exactly one mask"):
        prepare_inputs(path, path, box="0,0,8,8")
    with pytest.raises(UserError, match="mask not found"):
        prepare_inputs(path, tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(2).bytes(4096))
    with pytest.raises(UserError, match="cannot read mask"):
        prepare_inputs(path, tmp_path / "bad.mp4")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read mask image"):
        prepare_inputs(path, tmp_path / "bad.png")
    with pytest.raises(UserError, match="video not found"):
        prepare_inputs(tmp_path / "nope.mp4", box="0,0,8,8")
    with pytest.raises(UserError, match="4k\\+1"):
        prepare_inputs(path, box="0,0,8,8", frames=6)
    with pytest.raises(UserError, match="video has 9"):
        prepare_inputs(path, box="0,0,8,8", frames=13)
    with pytest.raises(UserError, match="multiple of 16"):
        prepare_inputs(path, box="0,0,8,8", height=40, width=48)


@pytest.mark.skipif(not DRIVING_MASK.exists(), reason="the shared driving clip is not on this machine")
def test_prepare_caps_size_and_length_at_the_model_limits():
    out = prepare_inputs(DRIVING, DRIVING_MASK, area=256 * 256, max_frames=17)
    assert out.video.shape == (17, 192, 336, 3)  # 854x480 within 256x256 pixels, sides multiples of 16
    assert out.mask.shape == (17, 192, 336)


def test_prepare_real_driving_clip():
    out = prepare_inputs(DRIVING, DRIVING_MASK, frames=9, height=128, width=224)
    assert out.video.shape == (9, 128, 224, 3) and out.video.dtype == np.uint8
    assert out.mask.shape == (9, 128, 224) and out.mask.dtype == np.bool_
    assert 0.18 < out.mask.mean() < 0.32
    assert out.fps == pytest.approx(30)
    assert any("832x480" in n and "854x480" in n for n in out.notes)


# ------------------------------------------------------------------------------------------------ pictures


def test_composite_takes_generated_inside_and_original_outside():
    original, generated = random_frames(3, 16, 16), random_frames(3, 16, 16)
    mask = RNG.random((3, 16, 16)) < 0.5
    out = composite(original, generated, mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask], generated[mask])
    np.testing.assert_array_equal(out[~mask], original[~mask])
    with pytest.raises(ValueError):
        composite(original, generated[:, :8], mask)
    with pytest.raises(ValueError):
        composite(original, generated, mask[:2])


def test_overlay_and_side_by_side():
    video, output = random_frames(2, 16, 32), random_frames(2, 16, 32)
    mask = np.zeros((2, 16, 32), dtype=bool)
    mask[:, 4:8, 4:8] = True
    solid = mask_overlay(video, mask, color=(1, 2, 3), alpha=1.0)
    assert (solid[mask] == (1, 2, 3)).all()
    np.testing.assert_array_equal(solid[~mask], video[~mask])
    panel = side_by_side(video, mask, output)
    assert panel.shape == (2, 16, 96, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:, :, :32], video)
    np.testing.assert_array_equal(panel[:, :, 32:64], mask_overlay(video, mask))
    np.testing.assert_array_equal(panel[:, :, 64:], output)


# ------------------------------------------------------------------------------------------------ damaged files
def faststart_video(path: Path, frames: np.ndarray) -> Path:
    """An MP4 with its index at the front (as web uploads are), which a cut-off copy keeps."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_a_truncated_video_is_named_truncated_not_short(tmp_path):
    whole = faststart_video(tmp_path / "whole.mp4", random_frames(41, 32, 48))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert read_frames(whole).frames.shape[0] == 41
    for frames in (None, 33):
        with pytest.raises(UserError, match=r"video .*cut.mp4 is truncated: its index lists 41 frames but the file "
                                            r"holds data for \d+ \(\d+ decoded\): copy or download it again"):
            prepare_inputs(cut, box="0,0,8,8", frames=frames)
    assert prepare_inputs(cut, box="0,0,8,8", frames=5).video.shape[0] == 5  # the intact start is usable


# ------------------------------------------------------------------------------------------------ containers
@pytest.mark.parametrize(("suffix", "format_name"), [(".mp4", "mp4"), (".mov", "mov"), (".MKV", "matroska")])
def test_the_suffix_names_the_container(tmp_path, suffix, format_name):
    frames = random_frames(3, 16, 32)
    path = write_video(tmp_path / f"out{suffix}", frames, 8.0, lossless=True)
    with av.open(str(path)) as container:
        assert format_name in container.format.name.split(",")
    np.testing.assert_array_equal(read_frames(path).frames, frames)


@pytest.mark.parametrize(("name", "message"), [("out.avi", "ends in '.avi'"), ("out", "has no extension")])
def test_other_suffixes_are_refused_and_nothing_is_written(tmp_path, name, message):
    with pytest.raises(UserError, match=f"{message}: name it .mp4"):
        write_video(tmp_path / name, random_frames(1, 16, 16), 8.0)
    assert list(tmp_path.iterdir()) == []


def test_sources_are_described_at_the_rate_they_are_used(tmp_path):
    Image.fromarray(random_frames(1, 20, 30)[0]).save(tmp_path / "still.png")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.fromarray(random_frames(1, 20, 30)[0]).save(tmp_path / "frames" / f"{i}.png")
    assert V.describe_source(tmp_path / "still.png").endswith("(30x20 image, one frame at 16 fps)")
    assert read_frames(tmp_path / "still.png").fps == 16.0
    assert V.describe_source(tmp_path / "frames").endswith("(30x20, 3 images at 16 fps)")
    video = write_video(tmp_path / "v.mp4", random_frames(3, 16, 32), 12.0)
    assert V.describe_source(video) == f"{video} (32x16, 3 frames, 12 fps)"
    assert not V.has_audio(video) and not V.has_audio(tmp_path / "still.png")


@pytest.mark.skipif(not DRIVING.exists(), reason="needs the shared driving clip")
def test_the_driving_clip_has_audio():
    assert V.has_audio(DRIVING) and not V.has_audio(DRIVING_MASK)


def test_sizes_above_the_models_limit_are_refused_before_resizing(tmp_path, monkeypatch):
    video = write_video(tmp_path / "v.mp4", random_frames(1, 16, 32), 8.0)
    monkeypatch.setattr(V, "fit_frames", lambda *a, **k: pytest.fail("resized"))
    with pytest.raises(UserError, match=r"32000x16000 is 512,000,000 pixels per frame, more than the 100 "):
        prepare_inputs(video, box="0,0,8,8", height=16000, max_area=100)


def test_an_empty_mask_is_refused_where_there_is_nothing_to_compare():
    V.check_mask_covers(np.ones((1, 2, 2), dtype=bool), "compare")
    with pytest.raises(UserError, match="^the mask is empty: nothing to compare: pass a mask"):
        V.check_mask_covers(np.zeros((1, 2, 2), dtype=bool), "compare")
