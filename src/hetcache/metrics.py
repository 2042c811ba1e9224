"""Fidelity of an edited video to a reference: PSNR and SSIM over the frame, inside the mask and on its margin band,
and LPIPS when the user supplies a model file.

Videos are uint8 arrays [F, H, W, 3]; regions are bool arrays [F, H, W]. A region's PSNR uses the mean squared
error over its pixels only (all frames and channels pooled, values in [0, 1]); a region's SSIM is the mean of the
SSIM map (torchmetrics, Gaussian window 11, sigma 1.5, computed on whole frames) over its pixels. Errors are
summed in integers, so PSNR is exact. Frames are processed a few at a time to bound memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from hetcache.errors import UserError

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


def psnr(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """PSNR in dB over `region` (None: every pixel): inf for identical pixels, None for an empty region."""
    _check(pred, target, region)
    squared, count = 0, 0
    for f in range(len(pred)):
        diff = pred[f].astype(np.int32) - target[f].astype(np.int32)
        sq = (diff * diff).sum(axis=-1, dtype=np.int64)
        if region is None:
            squared += int(sq.sum())
            count += sq.size
        else:
            squared += int(sq[region[f]].sum())
            count += int(region[f].sum())
    if count == 0:
        return None
    if squared == 0:
        return math.inf
    mse = squared / (count * 3 * _MAX**2)
    return -10.0 * math.log10(mse)


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


def fidelity(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    *,
    band_px: int = BAND_PX,
    lpips: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> dict[str, float | None]:
    """psnr_/ssim_ over the frame, the mask and the margin band, and lpips (None without a model)."""
    regions = {"frame": None, "mask": mask, "band": band(mask, band_px)}
    out = {f"psnr_{name}": psnr(pred, target, region) for name, region in regions.items()}
    out.update({f"ssim_{name}": value for name, value in ssim_regions(pred, target, regions).items()})
    out["lpips"] = None if lpips is None else lpips(pred, target)
    return out


class LPIPS:
    """LPIPS from a model file the user provides (never downloaded): a TorchScript file (`torch.jit.save`) or a
    whole pickled `nn.Module` (`torch.save(model)`), called as `model(x, y)` on float [B, 3, H, W] frames in
    [-1, 1] (the `lpips` package's convention) and returning one distance per frame. The score is the mean over
    frames, whole frames only.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        if not os.path.isfile(path):
            raise UserError(f"LPIPS model file not found: {path}: pass a TorchScript or torch.save'd LPIPS module")
        self.device = torch.device(device)
        try:
            self.model = torch.jit.load(str(path), map_location=self.device)
        except RuntimeError:
            try:
                model = torch.load(str(path), map_location=self.device, weights_only=False)
            except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
                raise UserError(f"cannot load LPIPS model {path}: {error}: save it with torch.jit.save") from None
            if not isinstance(model, torch.nn.Module):
                raise UserError(f"{path} holds a {type(model).__name__}, not a module: save the whole LPIPS model")
            self.model = model
        self.model.eval()

    @torch.no_grad()
    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        _check(pred, target, None)
        total = 0.0
        for start in range(0, len(pred), _CHUNK):
            p = _to_tensor(pred[start : start + _CHUNK]).to(self.device) * 2 - 1
            t = _to_tensor(target[start : start + _CHUNK]).to(self.device) * 2 - 1
            total += float(self.model(p, t).double().reshape(len(p), -1).mean(dim=1).sum())
        return total / len(pred)
