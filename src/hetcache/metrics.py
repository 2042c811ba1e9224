"""Fidelity of an edited video to a reference: PSNR and SSIM over the frame, inside the mask and on its margin band,
LPIPS over the frame and inside the mask when the user supplies weights, temporal consistency, and the
distribution distances VFID and KID over video features.

Videos are uint8 arrays [F, H, W, 3]; regions are bool arrays [F, H, W]. PSNR comes two ways: pooled (`psnr`: the
mean squared error over all of a region's pixels in all frames, values in [0, 1]) and per frame (`psnr_per_frame`:
the mean over frames of each frame's PSNR over its region pixels, as the video-editing literature reports it; an
exact frame counts at the largest finite PSNR of its region).
A region's SSIM is the mean of the SSIM map (torchmetrics, Gaussian window 11, sigma 1.5, computed on whole
frames) over its pixels. Errors are summed in integers, so PSNR is exact. Frames are processed a few at a time to
bound memory. The LPIPS and I3D networks are `hetcache.networks`; user weight files load there as state dicts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from hetcache.errors import UserError
from hetcache.networks import I3DNetwork, LPIPSNetwork, load_network

# Width of the margin band in pixels: one 16x16 token around the mask, where seams between the generated region
# and the kept video show first.
BAND_PX = 16
_CHUNK = 4  # frames per SSIM / LPIPS batch
_MAX = 255


def _check(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None) -> None:
    for name, video in (("pred", pred), ("target", target)):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 [F,H,W,3], got {video.dtype} {video.shape}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if region is not None and (region.dtype != np.bool_ or region.shape != pred.shape[:3]):
        raise ValueError(f"region must be bool {pred.shape[:3]}, got {region.dtype} {region.shape}")


def _squared_errors(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None) -> list[tuple[int, int]]:
    """Per frame: (sum of squared 8-bit errors over the region's pixels and channels, region pixels)."""
    _check(pred, target, region)
    per_frame = []
    for f in range(len(pred)):
        diff = pred[f].astype(np.int32) - target[f].astype(np.int32)
        sq = (diff * diff).sum(axis=-1, dtype=np.int64)
        if region is None:
            per_frame.append((int(sq.sum()), sq.size))
        else:
            per_frame.append((int(sq[region[f]].sum()), int(region[f].sum())))
    return per_frame


def _psnr_of(squared: int, count: int) -> float:
    if squared == 0:
        return math.inf
    return -10.0 * math.log10(squared / (count * 3 * _MAX**2))


def psnr(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """Pooled PSNR in dB over `region` (None: every pixel) of all frames: inf for identical pixels, None for an
    empty region."""
    errors = _squared_errors(pred, target, region)
    count = sum(c for _, c in errors)
    return None if count == 0 else _psnr_of(sum(s for s, _ in errors), count)


def psnr_per_frame(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """The mean over frames of each frame's PSNR over its `region` pixels (None: every pixel); frames without
    region pixels are left out, None when no frame has any.

    A frame identical within its region counts at the largest finite PSNR its region allows, that of one 8-bit
    level off in one value (10 log10(3 n 255^2) for n pixels), so that one exact frame does not make the mean
    infinite; when every frame is identical the result is inf, as for the pooled PSNR."""
    errors = [(s, c) for s, c in _squared_errors(pred, target, region) if c]
    if not errors:
        return None
    if all(s == 0 for s, _ in errors):
        return math.inf
    return sum(_psnr_of(max(s, 1), c) for s, c in errors) / len(errors)


def ssim(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """Mean SSIM over `region` (None: every pixel), from the per-pixel SSIM map; None for an empty region."""
    return ssim_regions(pred, target, {"region": region})["region"]


def ssim_regions(
    pred: np.ndarray, target: np.ndarray, regions: dict[str, np.ndarray | None]
) -> dict[str, float | None]:
    """SSIM of several regions from one pass over the SSIM map (None in `regions`: the whole frame)."""
    for region in regions.values():
        _check(pred, target, region)
    sums = dict.fromkeys(regions, 0.0)
    counts = dict.fromkeys(regions, 0)
    for start in range(0, len(pred), _CHUNK):
        p = _to_tensor(pred[start : start + _CHUNK])
        t = _to_tensor(target[start : start + _CHUNK])
        _, full = structural_similarity_index_measure(p, t, data_range=1.0, return_full_image=True, reduction="none")
        per_pixel = full.double().mean(dim=1)  # [f, H, W], channels averaged
        for name, region in regions.items():
            if region is None:
                sums[name] += float(per_pixel.sum())
                counts[name] += per_pixel.numel()
            else:
                selected = torch.from_numpy(region[start : start + _CHUNK])
                sums[name] += float(per_pixel[selected].sum())
                counts[name] += int(selected.sum())
    return {name: (sums[name] / counts[name] if counts[name] else None) for name in regions}


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [f, H, W, 3] -> float32 [f, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / _MAX


def band(mask: np.ndarray, width: int = BAND_PX) -> np.ndarray:
    """The pixels within `width` pixels (square neighbourhood, per frame) of the mask, the mask excluded."""
    if mask.dtype != np.bool_ or mask.ndim != 3:
        raise ValueError(f"mask must be bool [F,H,W], got {mask.dtype} {mask.shape}")
    if width < 1:
        return np.zeros_like(mask)
    grown = F.max_pool2d(torch.from_numpy(mask).float()[:, None], 2 * width + 1, stride=1, padding=width)[:, 0]
    return grown.numpy().astype(bool) & ~mask


# The fidelity scores, in the order of every table that lists them.
FIDELITY_KEYS = (
    "psnr_frame", "psnr_mask", "psnr_band", "psnr_frame_per_frame", "psnr_mask_per_frame", "psnr_band_per_frame",
    "ssim_frame", "ssim_mask", "ssim_band", "lpips", "lpips_mask",
)


def fidelity(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    *,
    band_px: int = BAND_PX,
    lpips: LPIPS | None = None,
) -> dict[str, float | None]:
    """FIDELITY_KEYS: pooled and per-frame PSNR and SSIM over the frame, the mask and the margin band, and LPIPS
    over the frame and inside the mask (None without LPIPS weights)."""
    regions = {"frame": None, "mask": mask, "band": band(mask, band_px)}
    out = {f"psnr_{name}": psnr(pred, target, region) for name, region in regions.items()}
    out.update({f"psnr_{name}_per_frame": psnr_per_frame(pred, target, region) for name, region in regions.items()})
    out.update({f"ssim_{name}": value for name, value in ssim_regions(pred, target, regions).items()})
    out["lpips"], out["lpips_mask"] = (None, None) if lpips is None else lpips.scores(pred, target, mask)
    return {key: out[key] for key in FIDELITY_KEYS}


class LPIPS:
    """LPIPS of a video against a reference, frame by frame, from a network that maps two batches of frames in
    [-1, 1] to a list of distance maps [B, 1, h, w] (`networks.LPIPSNetwork`; `from_file` loads its weights).

    The whole-frame score is the mean over frames of each frame's LPIPS (the sum over maps of their spatial
    means). Inside a region: each map is upsampled bilinearly to the frame and summed (the per-pixel LPIPS map,
    the lpips package's `spatial=True`), averaged over the region's pixels in each frame, then over the frames
    that have region pixels. The maps see the whole frame, so the masked score still weighs a little context
    around the region (the receptive fields), as the masked SSIM does.
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LPIPS:
        """LPIPS with the weights of `path`: a state dict of the lpips package's LPIPS module (AlexNet or VGG),
        as safetensors or a `torch.save` file; never downloaded."""
        return cls(load_network(path, LPIPSNetwork, "LPIPS", device), device)

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        """The whole-frame score."""
        return self.scores(pred, target, None)[0]

    @torch.no_grad()
    def scores(self, pred: np.ndarray, target: np.ndarray, region: np.ndarray | None) -> tuple[float, float | None]:
        """(whole-frame LPIPS, LPIPS inside `region` or None when it is empty or not given)."""
        _check(pred, target, region)
        frame_scores, region_scores = [], []
        for start in range(0, len(pred), _CHUNK):
            p = _to_tensor(pred[start : start + _CHUNK]).to(self.device) * 2 - 1
            t = _to_tensor(target[start : start + _CHUNK]).to(self.device) * 2 - 1
            maps = [m.double() for m in self.network(p, t)]
            frame_scores += sum(m.mean(dim=(1, 2, 3)) for m in maps).tolist()
            if region is None:
                continue
            size = p.shape[-2:]
            per_pixel = sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)[:, 0]
            for pixels, selected in zip(per_pixel.cpu(), torch.from_numpy(region[start : start + _CHUNK])):
                if selected.any():
                    region_scores.append(float(pixels[selected].mean()))
        masked = sum(region_scores) / len(region_scores) if region_scores else None
        return sum(frame_scores) / len(frame_scores), masked


# ------------------------------------------------------------------------------------------------ temporal
def temporal_consistency(
    pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None
) -> dict[str, float | None]:
    """How the frame-to-frame change of `pred` departs from the reference's, in 8-bit levels.

    With D_t(x) = x[t+1] - x[t] per pixel and channel, over the pixels of region[t] | region[t+1] (None: every
    pixel), pooled over all consecutive pairs and channels:
    - "temporal": mean |D_t(pred) - D_t(target)|, 0 when pred moves exactly like the reference;
    - "flicker": mean |D_t(pred)| - mean |D_t(target)|, > 0 when pred changes more between frames than the
      reference (flicker, boiling texture), < 0 when it changes less (frozen content).
    Both are None for a single frame or an empty region.
    """
    _check(pred, target, region)
    error, moved_pred, moved_target, count = 0, 0, 0, 0
    for t in range(len(pred) - 1):
        step_pred = pred[t + 1].astype(np.int16) - pred[t].astype(np.int16)
        step_target = target[t + 1].astype(np.int16) - target[t].astype(np.int16)
        if region is not None:
            pair = region[t] | region[t + 1]
            step_pred, step_target = step_pred[pair], step_target[pair]
        error += int(np.abs(step_pred - step_target).sum(dtype=np.int64))
        moved_pred += int(np.abs(step_pred).sum(dtype=np.int64))
        moved_target += int(np.abs(step_target).sum(dtype=np.int64))
        count += step_pred.size
    if count == 0:
        return {"temporal": None, "flicker": None}
    return {"temporal": error / count, "flicker": (moved_pred - moved_target) / count}


# ------------------------------------------------------------------------------------------------ VFID
# Clips for video features: VFID_CLIP_FRAMES consecutive frames (the whole video when shorter) starting every
# VFID_CLIP_STRIDE frames, each resized to VFID_SIZE x VFID_SIZE, the input size of Kinetics-trained I3D models.
VFID_CLIP_FRAMES = 16
VFID_CLIP_STRIDE = 8
VFID_SIZE = 224


def clip_windows(num_frames: int, length: int = VFID_CLIP_FRAMES, stride: int = VFID_CLIP_STRIDE) -> list[slice]:
    """The frame windows a video of `num_frames` frames contributes to VFID: one per start 0, stride, ... that
    fits, or the whole video when it is shorter than `length`."""
    if num_frames < 1 or length < 1 or stride < 1:
        raise ValueError(f"need positive num_frames, length and stride, got {num_frames}, {length}, {stride}")
    if num_frames <= length:
        return [slice(0, num_frames)]
    return [slice(start, start + length) for start in range(0, num_frames - length + 1, stride)]


def min_vfid_clips(dim: int) -> int:
    """Clips each set needs for a Fréchet distance on `dim`-dimensional features: dim + 1.

    A sample covariance of n feature vectors has rank at most n - 1, so below dim + 1 clips it is singular and
    the matrix square root in the distance is not defined by the data (the released HetCache evaluation used one
    1024-d vector per video over a handful of videos). At the minimum the estimate is still noisy and biased
    upwards: compare VFIDs only between sets of the same size.
    """
    return dim + 1


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as tr((R S2 R)^(1/2)) with R = S1^(1/2): both matrices have the same eigenvalues,
    and R S2 R is symmetric, so two symmetric eigendecompositions in float64 replace a general matrix square
    root (eigenvalues that rounding makes slightly negative count as 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    inner = root @ sigma2 @ root
    cross = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    distance = float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)
    return max(distance, 0.0)  # rounding can leave -1e-16 for identical sets


def vfid(reference: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between two sets of clip features [n, dim] (mean and unbiased covariance of each set).

    Raises ValueError when a set has fewer than `min_vfid_clips(dim)` clips, where the covariance is singular.
    """
    if reference.ndim != 2 or generated.ndim != 2 or reference.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sets must be [n, dim] of one dim, got {reference.shape} and {generated.shape}")
    need = min_vfid_clips(reference.shape[1])
    fewest = min(len(reference), len(generated))
    if fewest < need:
        raise ValueError(f"VFID needs at least {need} clips per set for {reference.shape[1]}-d features, got {fewest}")
    sets = [features.astype(np.float64) for features in (reference, generated)]
    (mu1, sigma1), (mu2, sigma2) = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in sets]
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def min_kid_clips() -> int:
    """Clips each set needs for KID's unbiased estimate: 2 (it averages over pairs of distinct clips)."""
    return 2


def kid(reference: np.ndarray, generated: np.ndarray) -> float:
    """Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018) between two sets of clip
    features [n, dim]: the unbiased estimate of the squared MMD with the kernel k(x, y) = (x.y / dim + 1)^3,
    over the whole sets (no subsets). Unlike VFID it needs no covariance, so a handful of clips suffices; being
    unbiased it can come out slightly negative when the sets match. Raises ValueError below `min_kid_clips()`.
    """
    if reference.ndim != 2 or generated.ndim != 2 or reference.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sets must be [n, dim] of one dim, got {reference.shape} and {generated.shape}")
    fewest = min(len(reference), len(generated))
    if fewest < min_kid_clips():
        raise ValueError(f"KID needs at least {min_kid_clips()} clips per set, got {fewest}")
    x, y = reference.astype(np.float64), generated.astype(np.float64)
    dim = x.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / dim + 1.0) ** 3

    def within(a: np.ndarray) -> float:
        k = kernel(a, a)
        return float((k.sum() - np.trace(k)) / (len(a) * (len(a) - 1)))

    return within(x) + within(y) - 2.0 * float(kernel(x, y).mean())


class I3D:
    """Video features from a network that maps clips [B, 3, T, 224, 224] in [-1, 1] to [B, dim] features
    (`networks.I3DNetwork`; `from_file` loads its weights; [B, dim, ...] outputs are averaged over the trailing
    dimensions, i.e. global average pooling). Calling it on a video gives one row per clip window.
    """

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", batch: int = 4) -> None:
        self.device = torch.device(device)
        self.model = network.to(self.device).eval()
        self.batch = batch

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch: int = 4) -> I3D:
        """I3D with the weights of `path`: an RGB I3D state dict (e.g. the PyTorch port's `rgb_imagenet.pt`), as
        safetensors or a `torch.save` file; never downloaded."""
        return cls(load_network(path, I3DNetwork, "I3D", device), device, batch)

    @torch.no_grad()
    def __call__(self, video: np.ndarray) -> np.ndarray:
        _check(video, video, None)
        clips = [video[window] for window in clip_windows(len(video))]
        rows = []
        for start in range(0, len(clips), self.batch):
            batch = torch.stack([self._clip(c) for c in clips[start : start + self.batch]]).to(self.device)
            out = self.model(batch)
            if out.ndim < 2 or out.shape[0] != len(batch):
                shape = tuple(out.shape)
                raise UserError(f"the I3D model returned shape {shape}: it must return [batch, dim] features")
            rows.append(out.float().reshape(*out.shape[:2], -1).mean(dim=-1).cpu())
        return torch.cat(rows).double().numpy()

    @staticmethod
    def _clip(frames: np.ndarray) -> torch.Tensor:
        """uint8 [t, H, W, 3] -> float32 [3, t, 224, 224] in [-1, 1] (bilinear, antialiased)."""
        x = F.interpolate(_to_tensor(frames), size=(VFID_SIZE, VFID_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
        return (x * 2 - 1).clamp(-1, 1).permute(1, 0, 2, 3)
