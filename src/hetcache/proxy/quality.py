"""How well the proxy inpaints: PSNR inside the mask on held-out clips, against a copy-from-elsewhere baseline.

The baseline fills each hidden pixel with its temporal median over the frames where it is visible, and the pixels
hidden in every frame by push-pull interpolation from the nearest visible ones. It is what a user gets without a
model, so the proxy must beat it clearly to count as a real inpainter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hetcache.metrics import psnr
from hetcache.proxy.architecture import FRAMES, HEIGHT, WIDTH
from hetcache.proxy.scenes import generate_scenes

# Held-out clips use generators seeded from here on; training draws from one generator seeded with its own seed.
HELD_OUT_SEED = 1_000_000
EDIT_PROMPT = "remove the object"


@dataclass
class HeldOutClip:
    """uint8 [F, H, W, 3] `video` (grey where hidden) and `target`; bool [F, H, W] `mask`."""

    video: np.ndarray
    mask: np.ndarray
    target: np.ndarray


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], rounded as the pipeline's input processor sees it."""
    return ((frames.permute(1, 2, 3, 0).float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def held_out_clips(count: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> list[HeldOutClip]:
    """`count` generated clips never seen in training (each from its own generator seed)."""
    clips = []
    for index in range(count):
        generator = torch.Generator().manual_seed(HELD_OUT_SEED + index)
        batch = generate_scenes(1, frames, height, width, generator)
        clips.append(
            HeldOutClip(video=to_uint8(batch.video[0]), mask=batch.mask[0, 0].numpy(), target=to_uint8(batch.target[0]))
        )
    return clips


def _push_pull(values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Fill unknown pixels of `values` [C, H, W] from a pyramid of known-weighted averages (`known` [1, H, W])."""
    if bool(known.all()) or min(values.shape[-2:]) == 1:
        total = known.sum().clamp_min(1.0)
        mean = (values * known).flatten(1).sum(1) / total
        return torch.where(known > 0, values, mean.view(-1, 1, 1))
    weight = F.avg_pool2d(known.unsqueeze(0), 2, ceil_mode=True)[0]
    coarse = F.avg_pool2d((values * known).unsqueeze(0), 2, ceil_mode=True)[0] / weight.clamp_min(1e-8)
    filled = _push_pull(coarse, (weight > 0).float())
    upsampled = F.interpolate(filled.unsqueeze(0), size=values.shape[-2:], mode="bilinear", align_corners=False)[0]
    return torch.where(known > 0, values, upsampled)


def median_fill(video: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The baseline: temporal median of the visible values per pixel, push-pull for pixels never visible.

    video: uint8 [F, H, W, 3]; mask: bool [F, H, W] (True = hidden). Visible pixels are returned unchanged.
    """
    frames = torch.from_numpy(video).float()
    hidden = torch.from_numpy(mask)
    values = frames.masked_fill(hidden.unsqueeze(-1), float("nan"))
    median = values.nanmedian(dim=0).values  # [H, W, 3]; NaN where hidden in every frame
    seen = ~median[..., 0].isnan()
    median = _push_pull(median.nan_to_num(0.0).permute(2, 0, 1), seen.float().unsqueeze(0)).permute(1, 2, 0)
    filled = torch.where(hidden.unsqueeze(-1), median.unsqueeze(0), frames)
    return filled.round().clamp(0, 255).to(torch.uint8).numpy()


def mask_psnr(output: np.ndarray, clip: HeldOutClip) -> float:
    """PSNR (dB) of `output` against the clip's hidden ground truth, inside the mask only."""
    value = psnr(output, clip.target, clip.mask)
    if value is None:
        raise ValueError("the clip's mask is empty")
    return value
