"""Token partition: which latent tokens an edit generates (G), which border them (M), which only give context (C).

A partial step recomputes all of G, part of M and a little of C, so the partition decides where compute goes.
It is built once per video, on the mask's device, without host round trips except one to size the index lists.
Tokens are numbered row-major over the latent token grid (t, h, w): idx = t * H' * W' + h * W' + w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetcache.errors import UserError

PIXELS_PER_TOKEN = 16
"""Pixels per token side for Wan: VAE stride 8 times patch size 2."""

FRAMES_PER_LATENT = 4
"""Pixel frames per latent frame for the Wan VAE; latent frame 0 holds pixel frame 0 alone."""

GENERATIVE, MARGIN, CONTEXT = 0, 1, 2
"""Label values of `TokenPartition.labels`."""


def latent_grid(pixel_shape: tuple[int, int, int], patch_size: tuple[int, int, int] = (1, 2, 2)) -> tuple[int, int, int]:
    """The token grid (T', H', W') the transformer sees for a pixel video or mask of shape (F, H, W).

    The Wan VAE keeps pixel frame 0 as latent frame 0 and folds every further FRAMES_PER_LATENT frames into one,
    and shrinks space by 8; the transformer then patches the latents by `patch_size`.
    """
    frames, height, width = pixel_shape
    p_t, p_h, p_w = patch_size
    return ((frames - 1) // FRAMES_PER_LATENT + 1) // p_t, height // (8 * p_h), width // (8 * p_w)


class MaskShapeError(UserError, ValueError):
    """A mask whose size or length cannot be fitted to the token grid (a `UserError` and a `ValueError`)."""


@dataclass(frozen=True, eq=False)
class TokenPartition:
    """The generative / margin / context split of one video's latent tokens; the three index sets are disjoint."""

    grid: tuple[int, int, int]
    """(T', H', W'): the token grid the transformer sees, reference-image frames included at the front."""
    num_reference_frames: int
    generative: torch.Tensor
    """Sorted int64 indices of G: tokens that cover masked pixels."""
    margin: torch.Tensor
    """Sorted int64 indices of M: non-G tokens near G in the same latent frame."""
    context: torch.Tensor
    """Sorted int64 indices of C: everything else, every reference-frame token included."""

    @property
    def num_tokens(self) -> int:
        frames, rows, cols = self.grid
        return frames * rows * cols

    def counts(self) -> dict[str, int]:
        """Sizes of the three sets (known on the host: no device sync)."""
        return {
            "generative": self.generative.numel(),
            "margin": self.margin.numel(),
            "context": self.context.numel(),
            "total": self.num_tokens,
        }

    def labels(self) -> torch.Tensor:
        """int8 [N]: GENERATIVE (0), MARGIN (1) or CONTEXT (2) per token."""
        labels = torch.full((self.num_tokens,), CONTEXT, dtype=torch.int8, device=self.context.device)
        labels[self.margin] = MARGIN
        labels[self.generative] = GENERATIVE
        return labels


def token_coverage(
    pixel_mask: torch.Tensor, grid_hw: tuple[int, int], *, frames_per_latent: int = FRAMES_PER_LATENT
) -> torch.Tensor:
    """Fraction of masked pixels under each token: float32 [T, H', W'] with T = (F - 1) / frames_per_latent + 1.

    Every pixel a token covers counts (all frames of its latent frame, the whole pixel block), so a mask that moves
    within a latent frame or touches any corner of a token is seen. `pixel_mask` is [F, H, W], bool or float (a pixel
    is masked when > 0.5); latent frame j >= 1 covers pixel frames (j - 1) * frames_per_latent + 1 ..
    j * frames_per_latent.
    """
    if pixel_mask.ndim != 3:
        raise MaskShapeError(f"mask has shape {tuple(pixel_mask.shape)}: give one [frames, height, width] mask")
    frames, height, width = pixel_mask.shape
    rows, cols = grid_hw
    if rows < 1 or cols < 1:
        raise ValueError(f"token grid {grid_hw} is empty: give a positive (rows, cols)")
    if frames < 1 or (frames - 1) % frames_per_latent:
        raise MaskShapeError(
            f"mask has {frames} frames: give {frames_per_latent}k+1 frames, one per video frame"
        )
    if height % rows or width % cols:
        raise MaskShapeError(
            f"mask of {height}x{width} pixels does not split into {rows}x{cols} token blocks: "
            "resize it to a multiple of the token grid"
        )
    block_h, block_w = height // rows, width // cols
    masked = pixel_mask if pixel_mask.dtype == torch.bool else pixel_mask > 0.5
    per_frame = masked.reshape(frames, rows, block_h, cols, block_w).sum(dim=(2, 4), dtype=torch.int32)
    first = per_frame[:1].float() / (block_h * block_w)
    later = per_frame[1:].reshape(-1, frames_per_latent, rows, cols).sum(dim=1).float()
    return torch.cat([first, later / (block_h * block_w * frames_per_latent)])


def partition_tokens(
    coverage: torch.Tensor,
    *,
    margin: int,
    gen_threshold: float = 0.0,
    num_reference_frames: int = 0,
    temporal_margin: int = 0,
) -> TokenPartition:
    """Split tokens by coverage [T, H', W']: G above `gen_threshold`, M within a disk of `margin` tokens of G.

    The disk lies in the same latent frame, stretched over `temporal_margin` latent frames either side when that is
    positive, so a frame without G has no margin unless a neighbour's reaches it. `num_reference_frames` all-context
    frames are prepended (indices of the video frames shift by that many frames).
    """
    if coverage.ndim != 3:
        raise ValueError(f"coverage has shape {tuple(coverage.shape)}: expected [frames, rows, cols]")
    if margin < 0 or temporal_margin < 0 or num_reference_frames < 0:
        raise ValueError(
            f"margin {margin}, temporal_margin {temporal_margin} and num_reference_frames "
            f"{num_reference_frames} must be >= 0"
        )
    generative = coverage > gen_threshold
    near = _dilate(generative, margin, temporal_margin)
    labels = torch.full(coverage.shape, CONTEXT, dtype=torch.int8, device=coverage.device)
    labels.masked_fill_(near, MARGIN).masked_fill_(generative, GENERATIVE)
    if num_reference_frames:
        references = labels.new_full((num_reference_frames, *coverage.shape[1:]), CONTEXT)
        labels = torch.cat([references, labels])
    flat = labels.flatten()
    by_label = torch.argsort(flat, stable=True)
    sizes = torch.bincount(flat.long(), minlength=3).tolist()
    generative_idx, margin_idx, context_idx = torch.split(by_label, sizes)
    return TokenPartition(
        grid=tuple(labels.shape),
        num_reference_frames=num_reference_frames,
        generative=generative_idx,
        margin=margin_idx,
        context=context_idx,
    )


def partition_from_pixel_mask(
    pixel_mask: torch.Tensor,
    grid: tuple[int, int, int],
    *,
    margin: int,
    gen_threshold: float = 0.0,
    temporal_margin: int = 0,
    num_reference_frames: int | None = None,
) -> TokenPartition:
    """Partition the transformer's token grid (T', H', W') from a pixel mask [F, H, W] (1 = generate).

    A mask whose size does not split into token blocks is resized with nearest-exact (pixel-centre) sampling to
    (16 H', 16 W'). Latent frames the mask lacks are reference-image frames at the front; pass
    `num_reference_frames` (the number of reference images) to have the mask's length checked exactly.
    """
    if pixel_mask.ndim != 3:
        raise MaskShapeError(f"mask has shape {tuple(pixel_mask.shape)}: give one [frames, height, width] mask")
    frames_total, rows, cols = grid
    frames, height, width = pixel_mask.shape
    if frames < 1 or (frames - 1) % FRAMES_PER_LATENT:
        raise MaskShapeError(f"mask has {frames} frames: give {FRAMES_PER_LATENT}k+1 frames, one per video frame")
    latent_frames = (frames - 1) // FRAMES_PER_LATENT + 1
    references = frames_total - latent_frames if num_reference_frames is None else num_reference_frames
    if references < 0 or latent_frames + references != frames_total:
        video_frames = (frames_total - max(references, 0) - 1) * FRAMES_PER_LATENT + 1
        raise MaskShapeError(
            f"mask has {frames} frames ({latent_frames} latent) but the model sees {frames_total} latent frames "
            f"with {max(references, 0)} reference image(s): give a mask with {video_frames} frames, "
            "as many as the video"
        )
    if height % rows or width % cols:
        pixel_mask = _resize_nearest(pixel_mask, (rows * PIXELS_PER_TOKEN, cols * PIXELS_PER_TOKEN))
    coverage = token_coverage(pixel_mask, (rows, cols))
    return partition_tokens(
        coverage,
        margin=margin,
        gen_threshold=gen_threshold,
        num_reference_frames=references,
        temporal_margin=temporal_margin,
    )


def _dilate(mask: torch.Tensor, radius: int, temporal_radius: int) -> torch.Tensor:
    """Tokens within a Euclidean disk of `radius` of a True token, over +-`temporal_radius` frames (a cylinder)."""
    offsets = torch.arange(-radius, radius + 1, device=mask.device)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2
    kernel = disk.float().expand(2 * temporal_radius + 1, -1, -1)
    # Counts of True tokens under the kernel are small integers, exact in any float type the convolution may use.
    hits = F.conv3d(
        mask.float()[None, None], kernel[None, None], padding=(temporal_radius, radius, radius)
    )
    return hits[0, 0] > 0.5


def _resize_nearest(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a mask [F, H, W] to `size` by pixel-centre nearest sampling (no top-left bias), as bool."""
    masked = pixel_mask if pixel_mask.dtype == torch.bool else pixel_mask > 0.5
    resized = F.interpolate(masked[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0] > 0.5
