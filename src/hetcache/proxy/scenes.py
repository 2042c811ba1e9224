"""Synthetic training and test clips made in code: textured scenes, a moving camera, moving objects, light changes.

The proxy model learns masked video inpainting from these clips alone, so they carry what the real task needs:
backgrounds whose hidden parts were visible in other frames (camera pan and zoom), objects that cross the mask,
global light changes, and masks of every kind the task meets (boxes and blobs, static and moving, 5-40 % of the
frame). Everything is batched torch code, so the same generator feeds a GPU trainer and the CPU tests; a seeded
`torch.Generator` makes every batch reproducible.

Pixel values are in [-1, 1], the range `WanVACEPipeline` feeds its VAE. The hidden region of the input is filled
with `FILL_VALUE`, the value the pipeline sees for mid-grey uint8 pixels (128), so training matches inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# uint8 128 after the pipeline's `x / 127.5 - 1`: the grey that hides the masked region.
FILL_VALUE = 128 / 127.5 - 1.0

# Mask area as a share of the frame (the task's range).
MASK_AREA = (0.05, 0.40)
MAX_OBJECTS = 3


@dataclass
class SceneBatch:
    """A batch of clips: `target` is the full scene, `video` hides the masked region with `FILL_VALUE`.

    video, target: float [B, 3, F, H, W] in [-1, 1]; mask: bool [B, 1, F, H, W] (True = regenerate).
    """

    video: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def random_textures(count: int, size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`count` colour textures [count, 3, size, size] in [-1, 1]: fractal noise plus optional stripes.

    Each texture has its own base colour, roughness (octave persistence), contrast and stripe pattern, so
    smooth skies, rough ground and regular facades all occur.
    """
    persistence = _uniform(generator, (count, 1, 1, 1), 0.3, 0.65, device)
    luminance = torch.zeros(count, 1, size, size, device=device)
    chroma = torch.zeros(count, 2, size, size, device=device)
    weight = torch.ones(count, 1, 1, 1, device=device)
    for octave in range(2, int(math.log2(size))):  # the finest detail is 2 pixels wide
        cells = 2**octave
        noise = torch.randn(count, 3, cells, cells, generator=generator, device=device)
        noise = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
        luminance += weight * noise[:, :1]
        chroma += weight * noise[:, 1:] * (0.5 if octave < 5 else 0.1)
        weight = weight * persistence
    luminance = luminance / luminance.flatten(1).std(dim=1).view(count, 1, 1, 1).clamp_min(1e-6)

    coords = torch.linspace(-1.0, 1.0, size, device=device)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angle = _uniform(generator, (count, 1, 1), 0.0, math.pi, device)
    frequency = _uniform(generator, (count, 1, 1), 2.0, 12.0, device)
    phase = _uniform(generator, (count, 1, 1), 0.0, 2 * math.pi, device)
    stripes = torch.sin(frequency * math.pi * (x * torch.cos(angle) + y * torch.sin(angle)) + phase)
    has_stripes = (torch.rand(count, 1, 1, generator=generator, device=device) < 0.35).float()
    luminance = luminance + (1.5 * has_stripes * stripes).unsqueeze(1)

    base = _uniform(generator, (count, 3, 1, 1), -0.6, 0.6, device)
    contrast = _uniform(generator, (count, 1, 1, 1), 0.08, 0.35, device)
    tint = _uniform(generator, (count, 3, 1, 1), -1.0, 1.0, device)
    colour = base + contrast * luminance * (1.0 + 0.3 * tint) + 0.1 * contrast * chroma.mean(1, keepdim=True) * tint
    colour = colour + 0.15 * contrast * torch.cat([chroma, -chroma.sum(1, keepdim=True)], dim=1)
    return colour.clamp(-1.0, 1.0)


def _shape_distance(u: torch.Tensor, v: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Normalised distance from a shape's centre (< 1 inside) for local coordinates u, v (1 = half-size).

    Shapes range from ellipses (p = 2) to rounded boxes (p = 8), with a wobbly outline for blobs.
    """
    p = params["power"]
    radius = (u.abs().pow(p) + v.abs().pow(p)).clamp_min(1e-12).pow(1.0 / p)
    theta = torch.atan2(v, u)
    wobble = 1.0 + sum(params["wobble"][..., k] * torch.cos((k + 2) * theta + params["phase"][..., k]) for k in range(3))
    return radius / wobble


def _random_shapes(count: int, generator: torch.Generator, device: torch.device, blob_share: float) -> dict:
    shape = (count, 1, 1, 1)
    is_box = torch.rand(shape, generator=generator, device=device) > 0.5
    power = torch.where(is_box, torch.full(shape, 8.0, device=device), torch.full(shape, 2.0, device=device))
    is_blob = (torch.rand(shape, generator=generator, device=device) < blob_share).float()
    wobble = _uniform(generator, (count, 1, 1, 1, 3), 0.0, 0.15, device) * is_blob.unsqueeze(-1)
    phase = _uniform(generator, (count, 1, 1, 1, 3), 0.0, 2 * math.pi, device)
    return {"power": power, "wobble": wobble, "phase": phase}


def _tracks(
    count: int, frames: int, generator: torch.Generator, device: torch.device, speed: float, moving_share: float
) -> torch.Tensor:
    """Centres [count, F, 2] in normalised [-1, 1] coordinates moving in straight lines (some stand still)."""
    start = _uniform(generator, (count, 1, 2), -0.6, 0.6, device)
    velocity = _uniform(generator, (count, 1, 2), -speed, speed, device)
    moving = (torch.rand(count, 1, 1, generator=generator, device=device) < moving_share).float()
    steps = torch.arange(frames, device=device, dtype=torch.float32).view(1, frames, 1)
    return start + moving * velocity * steps


def _grid(frames: int, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.linspace(-1.0, 1.0, height, device=device).view(1, 1, height, 1)
    x = torch.linspace(-1.0, 1.0, width, device=device).view(1, 1, 1, width)
    return y.expand(1, frames, height, width), x.expand(1, frames, height, width)


def _render_backgrounds(
    count: int, frames: int, height: int, width: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Textured canvases seen through a panning, zooming camera: [count, 3, F, H, W]."""
    canvas = random_textures(count, 2 * max(height, width), generator, device)
    sky = torch.rand(count, 1, 1, 1, generator=generator, device=device) < 0.3
    gradient = torch.linspace(0.5, -0.5, canvas.shape[-2], device=device).view(1, 1, -1, 1)
    canvas = torch.where(sky, (canvas + gradient * _uniform(generator, (count, 3, 1, 1), 0.0, 0.8, device)).clamp(-1, 1), canvas)

    zoom_start = _uniform(generator, (count, 1), 0.45, 0.6, device)
    zoom_rate = _uniform(generator, (count, 1), -0.012, 0.012, device)
    pan = _uniform(generator, (count, 1, 2), -0.03, 0.03, device)
    centre_start = _uniform(generator, (count, 1, 2), -0.3, 0.3, device)
    steps = torch.arange(frames, device=device, dtype=torch.float32)
    zoom = zoom_start * (1.0 + zoom_rate * steps.view(1, frames))
    centre = centre_start + pan * steps.view(1, frames, 1)

    aspect = width / height
    theta = torch.zeros(count, frames, 2, 3, device=device)
    theta[..., 0, 0] = zoom * min(aspect, 1.0)
    theta[..., 1, 1] = zoom * min(1.0 / aspect, 1.0)
    theta[..., :, 2] = centre
    grid = F.affine_grid(theta.flatten(0, 1), [count * frames, 3, height, width], align_corners=False)
    frames_out = F.grid_sample(
        canvas.repeat_interleave(frames, dim=0), grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return frames_out.view(count, frames, 3, height, width).transpose(1, 2)


def _render_objects(
    scene: torch.Tensor, generator: torch.Generator, device: torch.device, count_objects: torch.Tensor
) -> torch.Tensor:
    """Paint up to MAX_OBJECTS textured, moving, soft-edged objects over `scene` [B, 3, F, H, W] in place."""
    batch, _, frames, height, width = scene.shape
    y, x = _grid(frames, height, width, device)
    for index in range(MAX_OBJECTS):
        present = (count_objects > index).float().view(batch, 1, 1, 1)
        shapes = _random_shapes(batch, generator, device, blob_share=0.5)
        half = _uniform(generator, (batch, 1, 1, 1, 2), 0.08, 0.3, device)
        centre = _tracks(batch, frames, generator, device, speed=0.06, moving_share=0.85)
        u = (x - centre[..., 0].view(batch, frames, 1, 1)) / half[..., 0]
        v = (y - centre[..., 1].view(batch, frames, 1, 1)) / half[..., 1]
        distance = _shape_distance(u, v, shapes)
        alpha = torch.sigmoid((1.0 - distance) * 25.0) * present
        texture = random_textures(batch, 64, generator, device)
        local = torch.stack([u, v], dim=-1).clamp(-1.5, 1.5) / 1.5
        painted = F.grid_sample(
            texture.repeat_interleave(frames, dim=0), local.flatten(0, 1), mode="bilinear", align_corners=False
        ).view(batch, frames, 3, height, width).transpose(1, 2)
        shade = 1.0 - 0.25 * distance.clamp(0, 1).pow(2)
        painted = ((painted + 1.0) * shade.unsqueeze(1) - 1.0).clamp(-1, 1)
        scene.mul_(1.0 - alpha.unsqueeze(1)).add_(painted * alpha.unsqueeze(1))
    return scene


def _apply_lighting(scene: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Global brightness and colour drifts over time: [B, 3, F, H, W] -> same."""
    batch, _, frames = scene.shape[:3]
    steps = torch.arange(frames, device=device, dtype=torch.float32).view(1, 1, frames, 1, 1)
    amplitude = _uniform(generator, (batch, 1, 1, 1, 1), 0.0, 0.25, device)
    rate = _uniform(generator, (batch, 1, 1, 1, 1), 0.0, 0.4, device)
    phase = _uniform(generator, (batch, 1, 1, 1, 1), 0.0, 2 * math.pi, device)
    tint = _uniform(generator, (batch, 3, 1, 1, 1), -0.05, 0.05, device)
    gain = 1.0 + amplitude * torch.sin(rate * steps + phase) + tint * steps / max(frames - 1, 1)
    return ((scene + 1.0) * gain - 1.0).clamp(-1.0, 1.0)


def random_masks(
    batch: int, frames: int, height: int, width: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Boxes and blobs, static or moving, covering 5-40 % of the frame: bool [B, 1, F, H, W]."""
    y, x = _grid(frames, height, width, device)
    area = _uniform(generator, (batch, 1, 1, 1), *MASK_AREA, device)
    aspect = torch.exp(_uniform(generator, (batch, 1, 1, 1), -0.7, 0.7, device))
    shapes = _random_shapes(batch, generator, device, blob_share=0.6)
    # Half-sizes in normalised units: a box of half-sizes (a, b) covers a*b of the [-1, 1]^2 frame; an
    # ellipse covers pi/4 of that, so it is scaled up to the same area.
    ellipse = (shapes["power"] < 4).float()
    scale = 1.0 + ellipse * (math.sqrt(4 / math.pi) - 1.0)
    half_w = (area * aspect).sqrt() * scale
    half_h = (area / aspect).sqrt() * scale
    centre = _tracks(batch, frames, generator, device, speed=0.05, moving_share=0.5)
    reach = torch.stack([half_w, half_h], -1).view(batch, 1, 2).clamp(max=0.9)  # (x, y) half-extents
    centre = centre.clamp(-1.0 + reach, 1.0 - reach)
    u = (x - centre[..., 0].view(batch, frames, 1, 1)) / half_w
    v = (y - centre[..., 1].view(batch, frames, 1, 1)) / half_h
    return (_shape_distance(u, v, shapes) < 1.0).unsqueeze(1)


def generate_scenes(
    batch: int,
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> SceneBatch:
    """A batch of random scenes with random masks; the same generator state gives the same batch."""
    device = torch.device(device)
    scene = _render_backgrounds(batch, frames, height, width, generator, device)
    count_objects = torch.randint(0, MAX_OBJECTS + 1, (batch,), generator=generator, device=device)
    scene = _render_objects(scene, generator, device, count_objects)
    target = _apply_lighting(scene, generator, device)
    mask = random_masks(batch, frames, height, width, generator, device)
    video = torch.where(mask, torch.full_like(target, FILL_VALUE), target)
    return SceneBatch(video=video, target=target, mask=mask)


def removal_scene(
    frames: int, height: int, width: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A clip with one extra red object to remove: (video with the object, mask over it, target without it).

    The mask is the object's silhouette grown by a few pixels in every frame, the way a user would draw or track
    it; the target is the same scene with the object never painted. Tensors as in `SceneBatch`, batch 1.
    """
    generator = torch.Generator().manual_seed(seed)
    clip = generate_scenes(1, frames, height, width, generator)
    target = clip.target
    y, x = _grid(frames, height, width, target.device)
    steps = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    centre_x = -0.75 + 1.5 * steps / max(frames - 1, 1)
    centre_y = 0.25 + 0.15 * torch.sin(steps * 0.5)
    u, v = (x[0] - centre_x) / 0.22, (y[0] - centre_y) / 0.28
    distance = (u.square() + v.square()).sqrt()
    alpha = torch.sigmoid((1.0 - distance) * 25.0).view(1, 1, frames, height, width)
    red = torch.tensor([0.75, -0.8, -0.7]).view(1, 3, 1, 1, 1)
    shade = (1.0 - 0.4 * distance.clamp(0, 1).pow(2)).view(1, 1, frames, height, width)
    video = target * (1.0 - alpha) + ((red + 1.0) * shade - 1.0) * alpha
    grown = F.max_pool2d((alpha[0, 0] > 0.02).float().unsqueeze(1), kernel_size=9, stride=1, padding=4)
    mask = grown.view(1, 1, frames, height, width) > 0.5
    return video.clamp(-1, 1), mask, target
