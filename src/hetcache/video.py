"""Video and mask I/O: read, size, sample, composite and write clips (PyAV + numpy).

Frames are uint8 arrays [F, H, W, 3] (RGB); masks are bool arrays [F, H, W] where True means "generate".
Everything the model sees goes through `prepare_inputs`, so the video and its mask always share one frame
sampling, one size and one crop.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

from hetcache import files
from hetcache.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGE_FPS = 16.0  # frame rate given to image folders and single images (Wan2.1's native rate)
DEFAULT_AREA = 480 * 832
MAX_FRAMES = 81  # Wan2.1-VACE is trained on clips of up to 81 frames
SIZE_STEP = 16  # VAE x8 and patch x2: both sides must be multiples of 16
MASK_THRESHOLD = 127  # a mask pixel whose RGB mean exceeds this is "generate"
# Containers `write_video` writes, by file suffix (H.264 fits each of them).
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass
class Clip:
    """Decoded frames with the rate they play at and where they came from."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    source: str


@dataclass
class PreparedInputs:
    """A video and its mask, sampled and fitted to the size the model will run at."""

    video: np.ndarray  # uint8 [F, H, W, 3]
    mask: np.ndarray  # bool [F, H, W], True = generate
    fps: float  # source fps / stride
    notes: list[str] = field(default_factory=list)  # one line each, for the user


@dataclass
class _Sampled:
    """Frames 0, stride, 2*stride, ... of a source, read without decoding more than needed."""

    clip: Clip
    seen: int  # source frames decoded: all of them, or enough for `limit` samples
    last: np.ndarray  # the last frame decoded [H, W, 3]
    still: bool  # the source is one image file (meant to hold for every frame)


# ------------------------------------------------------------------------------------------------ reading


def read_frames(path: str | os.PathLike) -> Clip:
    """Read every frame of a video file, a folder of images or one image file (1 frame).

    Folder images (png/jpg/jpeg/bmp/webp) are sorted by name, numbers in numeric order (frame2 before frame10),
    and play at 16 fps, as does a single image.

    Raises UserError for a missing path, an unreadable or corrupt file, a video without frames and a folder
    without images.
    """
    return _read(path, role="video").clip


def _read(path: str | os.PathLike, *, role: str, stride: int = 1, limit: int | None = None) -> _Sampled:
    """Keep frames 0, stride, ... (at most `limit`), stop decoding once they are all in hand."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{role} not found: {p}: check the path")
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise UserError(
                f"{role} folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)}): add frames or pass a video file"
            )
        kept = files[::stride][:limit]
        frames = [_load_image(f, role) for f in kept]
        shape = frames[0].shape
        for f, a in zip(kept, frames):
            if a.shape != shape:
                raise UserError(
                    f"{role} folder {p}: {f.name} is {a.shape[1]}x{a.shape[0]}, not {shape[1]}x{shape[0]} "
                    "like the first image: give every frame the same size"
                )
        last = frames[-1] if kept[-1] == files[-1] else _load_image(files[-1], role)
        clip = Clip(np.stack(frames), IMAGE_FPS, str(p))
        return _Sampled(clip, len(files), last, still=False)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        frame = _load_image(p, role)
        return _Sampled(Clip(frame[None], IMAGE_FPS, str(p)), 1, frame, still=True)
    return _decode(p, role, stride, limit)


def _natural_key(path: Path) -> list:
    """frame2 before frame10; zero-padded names sort as usual."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name.lower())]


def _image_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def _load_image(path: Path, role: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {role} image {path}: {e}: check that it is a valid image file") from e


def _decode(path: Path, role: str, stride: int, limit: int | None) -> _Sampled:
    frames: list[np.ndarray] = []
    last_frame = None
    seen = 0
    stop = None if limit is None else (limit - 1) * stride + 1  # source frames needed for `limit` samples
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise UserError(f"{role} {path} has no video stream: pass a video with frames, a folder or an image")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else IMAGE_FPS
            size = None
            packets = _Count()
            for frame in _decoded(container, stream, packets):
                size = size or (frame.width, frame.height)
                if seen % stride == 0:
                    frames.append(_rgb(frame, size))
                last_frame = frame
                seen += 1
                if seen == stop:
                    break
            else:
                _check_complete(path, role, stream.frames, packets.value, seen)
            last = _rgb(last_frame, size) if last_frame is not None else None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"cannot read {role} {path}: {e}: check that the file is a complete, playable video") from e
    if not frames:
        raise UserError(f"{role} {path} has no frames: pass a video with at least one frame")
    return _Sampled(Clip(np.stack(frames), fps, str(path)), seen, last, still=False)


@dataclass
class _Count:
    value: int = 0


def _decoded(container: av.container.InputContainer, stream: av.VideoStream,
             packets: _Count) -> Iterator[av.VideoFrame]:
    """The stream's frames, counting the packets the demuxer found (the last, empty one only flushes)."""
    for packet in container.demux(stream):
        if packet.size:
            packets.value += 1
        yield from packet.decode()


def _check_complete(path: Path, role: str, declared: int, packets: int, decoded: int) -> None:
    """A file cut short after its index (an MP4 with the index at the front) demuxes fewer packets than the index
    lists, and PyAV's threaded decoder then stops without an error: say so instead of returning fewer frames."""
    if declared and packets < declared:
        raise UserError(
            f"{role} {path} is truncated: its index lists {declared} frames but the file holds data for {packets} "
            f"({decoded} decoded): copy or download it again"
        )


def _rgb(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """RGB array at the stream's first size (a size change mid-stream is scaled back to it)."""
    if (frame.width, frame.height) == size:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


def describe_source(path: str | os.PathLike) -> str:
    """'path (854x480, 222 frames, 30 fps)' as this module reads it: a video from its header, a folder of images
    or one image at IMAGE_FPS (the rate they are used at); just the path when it cannot be read."""
    p = Path(path)
    try:
        if p.is_dir():
            images = _image_files(p)
            with Image.open(images[0]) as first:
                width, height = ImageOps.exif_transpose(first).size
            return f"{p} ({width}x{height}, {len(images)} images at {IMAGE_FPS:g} fps)"
        if p.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(p) as image:
                width, height = ImageOps.exif_transpose(image).size
            return f"{p} ({width}x{height} image, one frame at {IMAGE_FPS:g} fps)"
        with av.open(str(p), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            parts = [f"{stream.width}x{stream.height}"]
            parts += [f"{stream.frames} frames"] if stream.frames else []
            parts += [f"{float(rate):g} fps"] if rate else []
            return f"{p} ({', '.join(parts)})"
    except (av.FFmpegError, OSError, ValueError, IndexError):
        return str(p)


def has_audio(path: str | os.PathLike) -> bool:
    """Whether a video file carries an audio track (which the edit's output, video only, will not have)."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with av.open(str(p), metadata_errors="ignore") as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ sizes


def default_size(height: int, width: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """The 480p-class (height, width) for a source of this shape.

    Rule: among sizes whose sides are multiples of 16 and whose pixel count is at most
    min(area, height * width) (so a small source is never enlarged), take the one that holds the largest
    rectangle of the source's aspect (the picture that survives `fit_frames` intact); ties go to the closer
    aspect, then to the larger size. Never below 16x16. 854x480 -> (480, 832), 480x854 -> (832, 480).
    """
    if height < 1 or width < 1:
        raise ValueError(f"default_size needs a positive size, got {width}x{height}")
    budget = max(min(area, height * width) // SIZE_STEP**2, 1)  # in 16x16 blocks
    aspect = width / height
    rows = np.arange(1, budget + 1)
    per_row = budget // rows  # every (h, w) with h * w <= budget, in blocks
    hs = np.repeat(rows, per_row)
    ws = np.arange(per_row.sum()) - np.repeat(np.cumsum(per_row) - per_row, per_row) + 1
    held = np.minimum(ws, hs * aspect)  # width of the largest source-aspect rectangle inside hs x ws
    aspect_error = np.abs(np.log(ws / hs / aspect))
    best = np.lexsort((-(hs * ws), aspect_error, -np.round(held, 9)))[0]
    return int(hs[best]) * SIZE_STEP, int(ws[best]) * SIZE_STEP


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < SIZE_STEP or value % SIZE_STEP:
            raise UserError(f"{name} {value} is not a positive multiple of {SIZE_STEP}: use e.g. 480 or 832")


def fit_frames(frames: np.ndarray, height: int, width: int, *, nearest: bool = False) -> np.ndarray:
    """Scale (keeping aspect) until the frames cover height x width, then cut the centre.

    uint8 [F, h, w, 3] frames use bicubic resampling unless `nearest`; bool [F, h, w] masks always use nearest,
    so they stay binary. A source that only needs cropping is sliced, never resampled.
    """
    _check_size(height, width)
    is_mask = frames.dtype == np.bool_
    if not (is_mask and frames.ndim == 3) and not (frames.dtype == np.uint8 and frames.ndim == 4):
        raise ValueError(f"fit_frames takes uint8 [F,h,w,3] or bool [F,h,w], got {frames.dtype} {frames.shape}")
    h, w = frames.shape[1:3]
    scale = max(height / h, width / w)
    if scale == 1:
        top, left = (h - height) // 2, (w - width) // 2
        return frames[:, top : top + height, left : left + width].copy()
    crop_h, crop_w = height / scale, width / scale  # the source region that lands in the output
    box = ((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2)
    resample = Image.Resampling.NEAREST if nearest or is_mask else Image.Resampling.BICUBIC
    source = frames.view(np.uint8) if is_mask else frames
    out = np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample, box=box)) for f in source])
    return out.view(np.bool_) if is_mask else out


# ------------------------------------------------------------------------------------------------ frames


def choose_frame_count(
    available: int, requested: int | None = None, stride: int = 1, max_frames: int = MAX_FRAMES
) -> int:
    """How many frames (4k+1, as the VAE packs 1 + 4 per latent frame) to take, every `stride`-th.

    `requested=None` takes as many as fit, up to `max_frames`; an explicit request is not capped by it.
    """
    if stride < 1:
        raise UserError(f"stride {stride} must be at least 1: use 1 to take every frame")
    if available < 1:
        raise UserError("the video has no frames: pass a video with at least one frame")
    fit = ((available - 1) // stride) // 4 * 4 + 1  # most 4k+1 frames whose span fits the source
    if requested is None:
        return min(fit, (max_frames - 1) // 4 * 4 + 1)
    _check_frame_count(requested)
    if (requested - 1) * stride + 1 > available:
        raise UserError(
            f"{requested} frames at stride {stride} need {(requested - 1) * stride + 1} source frames but the "
            f"video has {available}: use at most {fit} frames or a smaller stride"
        )
    return requested


def _check_frame_count(requested: int) -> None:
    if requested < 1:
        raise UserError(f"frame count {requested} must be at least 1: use 1, 5, 9, ... (4k+1)")
    if (requested - 1) % 4:
        below = (requested - 1) // 4 * 4 + 1
        raise UserError(f"frame count {requested} is not of the form 4k+1: use {below} or {below + 4}")


def frame_indices(count: int, stride: int = 1, start: int = 0) -> np.ndarray:
    """Source indices of the sampled frames: start, start + stride, ..."""
    return start + stride * np.arange(count, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ inputs


def prepare_inputs(
    video_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    *,
    box: str | tuple[int, int, int, int] | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    stride: int = 1,
    area: int = DEFAULT_AREA,
    max_frames: int = MAX_FRAMES,
    max_area: int | None = None,
) -> PreparedInputs:
    """Read, sample and fit a video and its mask (a mask video/folder/image, or a box) to one model size.

    The size defaults to `default_size` of the source within `area` pixels, and the frame count to as many as
    fit up to `max_frames`; with one side given the other follows the aspect. A size above `max_area` pixels is
    refused before anything is resized.
    Mask frames are taken at the video's indices: a shorter mask repeats its last frame (with a warning),
    a longer one is cut; a mask of another size is fitted on its own. `notes` says what was adjusted.
    """
    if (mask_path is None) == (box is None):
        raise UserError("give exactly one mask: a mask video/folder/image or a box 'x0,y0,x1,y1'")
    if stride < 1:
        raise UserError(f"stride {stride} must be at least 1: use 1 to take every frame")
    if frames is not None:
        _check_frame_count(frames)
    source = _read(video_path, role="video", stride=stride, limit=frames or max_frames)
    count = choose_frame_count(source.seen, frames, stride, max_frames)
    video = source.clip.frames[:count]
    src_h, src_w = video.shape[1:3]
    height, width = _model_size(src_h, src_w, height, width, area)
    if max_area is not None:
        check_area(height, width, max_area)
    notes: list[str] = []
    if box is not None:
        mask = _box_mask(box, src_h, src_w)
    else:
        mask = _mask_frames(mask_path, frame_indices(count, stride), stride, notes)
        mask_h, mask_w = mask.shape[1:3]
        if (mask_h, mask_w) != (src_h, src_w):
            notes.append(
                f"the mask is {mask_w}x{mask_h} but the video {src_w}x{src_h}: "
                f"the mask was resized and centre-cropped to {width}x{height} on its own"
            )
    mask = fit_frames(mask, height, width, nearest=True)
    if len(mask) == 1:
        mask = np.repeat(mask, count, axis=0)
    return PreparedInputs(fit_frames(video, height, width), mask, source.clip.fps / stride, notes)


def check_area(height: int, width: int, max_area: int) -> None:
    """UserError when a height x width frame has more than `max_area` pixels (the model's limit)."""
    if height * width > max_area:
        raise UserError(
            f"{width}x{height} is {height * width:,} pixels per frame, more than the {max_area:,} this model is run "
            f"at: use a smaller --height/--width"
        )


def check_mask_covers(mask: np.ndarray, purpose: str) -> None:
    """UserError when `mask` selects no pixel: with nothing to regenerate there is nothing to `purpose`."""
    if not mask.any():
        raise UserError(f"the mask is empty: nothing to {purpose}: pass a mask (or --box) over the region to edit")


def _model_size(
    src_h: int, src_w: int, height: int | None, width: int | None, area: int = DEFAULT_AREA
) -> tuple[int, int]:
    if height is None and width is None:
        return default_size(src_h, src_w, area)
    if width is None:
        width = max(SIZE_STEP, round(height * src_w / src_h / SIZE_STEP) * SIZE_STEP)
    elif height is None:
        height = max(SIZE_STEP, round(width * src_h / src_w / SIZE_STEP) * SIZE_STEP)
    _check_size(height, width)
    return height, width


def _mask_frames(path: str | os.PathLike, indices: np.ndarray, stride: int, notes: list[str]) -> np.ndarray:
    """Binary mask frames at the mask's own size, one per video index (one in all for a single image)."""
    sampled = _read(path, role="mask", stride=stride, limit=len(indices))
    frames = sampled.clip.frames
    if sampled.still:
        notes.append(f"the mask is a single image: used for all {len(indices)} frames")
    elif len(frames) < len(indices):
        missing = len(indices) - len(frames)
        note = (
            f"the mask has {sampled.seen} frames but the video uses frames up to {indices[-1]}: "
            f"its last frame is repeated for the last {missing} frames"
        )
        notes.append(note)
        warnings.warn(note, stacklevel=3)
        frames = np.concatenate([frames, np.repeat(sampled.last[None], missing, axis=0)])
    return _binarise(frames[: len(indices)])


def _binarise(frames: np.ndarray) -> np.ndarray:
    """True where the RGB mean exceeds 127 (as an integer sum, so 127 keeps and 128 generates exactly)."""
    total = frames[..., 0].astype(np.uint16)
    total += frames[..., 1]
    total += frames[..., 2]
    return total > 3 * MASK_THRESHOLD


def _box_mask(box: str | tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """One frame [1, height, width] holding a rectangle in source pixels, x1 and y1 exclusive."""
    if isinstance(box, str):
        try:
            box = tuple(int(v) for v in box.split(","))
        except ValueError:
            box = ()
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box):
        raise UserError(f"box {box!r} is not four integers x0,y0,x1,y1: use e.g. '100,50,400,300'")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(
            f"box {x0},{y0},{x1},{y1} is empty or outside the {width}x{height} video: "
            f"need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )
    mask = np.zeros((1, height, width), dtype=bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


# ------------------------------------------------------------------------------------------------ pictures


def _check_video(frames: np.ndarray, name: str) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 [F,H,W,3], got {frames.dtype} {frames.shape}")


def _check_mask(mask: np.ndarray, frames: np.ndarray) -> None:
    if mask.dtype != np.bool_ or mask.shape != frames.shape[:3]:
        raise ValueError(f"mask must be bool {frames.shape[:3]}, got {mask.dtype} {mask.shape}")


def composite(original: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The original outside the mask, the generated frames inside: nothing outside the mask can change."""
    _check_video(original, "original")
    _check_video(generated, "generated")
    if generated.shape != original.shape:
        raise ValueError(f"generated {generated.shape} and original {original.shape} differ in shape")
    _check_mask(mask, original)
    return np.where(mask[..., None], generated, original)


def mask_overlay(
    frames: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.5
) -> np.ndarray:
    """Tint the masked pixels with `color` at opacity `alpha`, to show what will be generated."""
    _check_video(frames, "frames")
    _check_mask(mask, frames)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tinted = np.rint((1 - alpha) * frames + alpha * np.asarray(color, dtype=np.float32)).astype(np.uint8)
    return np.where(mask[..., None], tinted, frames)


def side_by_side(video: np.ndarray, mask: np.ndarray, output: np.ndarray) -> np.ndarray:
    """[F, H, 3W, 3]: the input | the input with the mask tinted | the output."""
    _check_video(output, "output")
    if output.shape != video.shape:
        raise ValueError(f"output {output.shape} and video {video.shape} differ in shape")
    return np.concatenate([video, mask_overlay(video, mask), output], axis=2)


# ------------------------------------------------------------------------------------------------ writing


def _video_frame(frame: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")


def container_format(path: str | os.PathLike) -> str:
    """The container `write_video` writes for `path`'s suffix (.mp4, .mov, .mkv); UserError for any other, so no
    file gets a container its name does not say."""
    suffix = Path(path).suffix.lower()
    if suffix in CONTAINERS:
        return CONTAINERS[suffix]
    named = f"ends in {suffix!r}" if suffix else "has no extension"
    raise UserError(f"output {path} {named}: name it .mp4 (or .mov, .mkv), the containers written here")


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    *,
    crf: int = 18,
    lossless: bool = False,
    preset: str = "medium",
) -> Path:
    """Write an H.264 video in the container `path`'s suffix names (`container_format`: .mp4, .mov or .mkv),
    atomically (a temporary file in the same folder, then a rename). Video only: no audio track.

    Default: libx264, yuv420p (plays everywhere; needs even width and height). `lossless`: libx264rgb at
    crf 0, which `read_frames` returns bit-exact. Fractional rates (29.97, 7.5) are kept as fractions.
    """
    muxer = container_format(path)
    _check_video(frames, "frames")
    if len(frames) == 0:
        raise ValueError("write_video needs at least one frame")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    height, width = frames.shape[1:3]
    if not lossless and (height % 2 or width % 2):
        raise ValueError(f"yuv420p needs an even size, got {width}x{height}: crop or pass lossless=True")
    path = Path(path)
    with files.atomic_path(path) as temp:
        with av.open(str(temp), "w", format=muxer) as container:
            stream = container.add_stream(
                "libx264rgb" if lossless else "libx264", rate=Fraction(float(fps)).limit_denominator(100_000)
            )
            stream.width, stream.height = width, height
            stream.pix_fmt = "rgb24" if lossless else "yuv420p"
            stream.options = {"crf": "0" if lossless else str(crf), "preset": preset}
            container.start_encoding()
            for frame in frames:
                container.mux(stream.encode(_video_frame(frame)))
            container.mux(stream.encode(None))
    return path


def write_mask_video(path: str | os.PathLike, mask: np.ndarray, fps: float, **kw) -> Path:
    """Write a mask as a black-and-white video (white = generate); `kw` goes to `write_video`."""
    if mask.dtype != np.bool_ or mask.ndim != 3:
        raise ValueError(f"mask must be bool [F,H,W], got {mask.dtype} {mask.shape}")
    return write_video(path, np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255, fps, **kw)
