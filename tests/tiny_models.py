"""Tiny random WanVACE transformers and inputs for engine tests (float32, CPU)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import WanVACETransformer3DModel

TEXT_DIM = 32


def tiny_transformer(
    num_layers: int = 4, vace_layers: tuple[int, ...] = (0, 2), seed: int = 0, heads: int = 2
) -> WanVACETransformer3DModel:
    """A tiny model whose weights are scaled up so attention, hints and residuals are far from trivial.

    The width stays 32 whatever the number of heads (4 heads of 8 for 4-way sequence parallelism)."""
    torch.manual_seed(seed)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=32 // heads, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, vace_layers=list(vace_layers), vace_in_channels=96,
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return model.eval()


def diffusers_test_transformer(num_layers: int = 3, vace_layers: tuple[int, ...] = (0, 2)) -> WanVACETransformer3DModel:
    """diffusers' own WanVACE test configuration (2 heads x 12, FFN 32), default initialisation."""
    torch.manual_seed(0)
    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=list(vace_layers), vace_in_channels=96,
    ).eval()


def with_heads(pipe, heads: int):
    """The float32 tiny-random pipeline with its transformer rebuilt with `heads` heads of the same width (24),
    seeded, so that it can be split over `heads` processes (tiny-random's 2 heads allow 2)."""
    config = {**pipe.transformer.config, "num_attention_heads": heads, "attention_head_dim": 24 // heads}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = WanVACETransformer3DModel.from_config(config).eval()
    pipe.register_modules(transformer=transformer.to(pipe.transformer.device))
    return pipe


def tiny_inputs(seed: int = 0, grid: tuple[int, int, int] = (3, 4, 6), text_len: int = 8) -> dict[str, torch.Tensor]:
    """Latents, VACE control and text for a token grid (T', H', W') of patch (1, 2, 2)."""
    generator = torch.Generator().manual_seed(seed)
    frames, height, width = grid[0], grid[1] * 2, grid[2] * 2
    return {
        "hidden_states": torch.randn(1, 16, frames, height, width, generator=generator),
        "control_hidden_states": torch.randn(1, 96, frames, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(1, text_len, TEXT_DIM, generator=generator),
    }


def box_mask(grid: tuple[int, int, int], rows: slice, cols: slice) -> torch.Tensor:
    """Pixel mask [F, H, W] (True = generate) covering a box of tokens in every frame; F = 4(T'-1)+1."""
    frames = 4 * (grid[0] - 1) + 1
    mask = torch.zeros(frames, grid[1] * 16, grid[2] * 16, dtype=torch.bool)
    mask[:, rows.start * 16 : rows.stop * 16, cols.start * 16 : cols.stop * 16] = True
    return mask


def token_rows(output: torch.Tensor) -> torch.Tensor:
    """Model output [1, C, T, H, W] (patch 1x2x2) as one row per token: [N, C*4]."""
    _, channels, frames, height, width = output.shape
    x = output.reshape(channels, frames, height // 2, 2, width // 2, 2)
    return x.permute(1, 2, 4, 0, 3, 5).reshape(frames * (height // 2) * (width // 2), -1)


def demo_clip(frames: int = 17, height: int = 128, width: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic road scene and its mask: a red car drives left to right; the mask follows it with a margin.

    Returns uint8 [F, H, W, 3] and bool [F, H, W]. The sky is a vertical gradient and the road's texture and
    lane marks scroll, so the background moves as well as the masked object.
    """
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    horizon, lane_row = height // 2, (3 * height) // 4
    shade = y[:horizon, :, None] / horizon
    sky = np.concatenate([90 + 100 * shade, 150 + 60 * shade, np.full_like(shade, 235.0)], axis=-1)
    car_h, car_w, margin = height // 6, width // 6, 6
    car_top = horizon + 4
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    mask = np.zeros((frames, height, width), dtype=bool)
    for f in range(frames):
        video[f] = (70 + 20 * ((x + 3 * f) // 8 % 2))[..., None]
        video[f, :horizon] = sky
        video[f][(np.abs(y - lane_row) < 2) & ((x + 6 * f) % 32 < 16)] = 230
        left = 8 + (width - car_w - 16) * f // max(frames - 1, 1)
        video[f, car_top : car_top + car_h, left : left + car_w] = (200, 30, 30)
        top, bottom = max(car_top - margin, 0), car_top + car_h + margin
        mask[f, top:bottom, max(left - margin, 0) : left + car_w + margin] = True
    return video, mask


def output_head(model: WanVACETransformer3DModel, hidden: torch.Tensor, t: float, text: torch.Tensor,
                grid: tuple[int, int, int]) -> torch.Tensor:
    """The stock transformer head on a full hidden sequence [1, N, dim] (what REUSE and the rows outside a PARTIAL
    step's S must feed it), for a token grid of patch (1, 2, 2)."""
    temb = model.condition_embedder(torch.tensor([t]), text)[0]
    shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    h = model.proj_out(h)
    frames, height, width = grid
    h = h.reshape(1, frames, height, width, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)
