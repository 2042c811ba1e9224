"""The proxy model: the classes of Wan2.1-VACE at a size a laptop CPU runs, and the inputs the pipeline builds.

Sizes were chosen by timing random-weight candidates on 2 CPU cores: at 256x256 and 17 frames a transformer forward
took about 0.5 s and the VAE's two encodes plus one decode about 15 s, so a 20-step edit stays well under a
minute (the shipped model's timings are in docs/PROXY.md).
The latent has 32 channels, not Wan's 16: a VAE this small, trained for minutes, reconstructs far better through
the wider bottleneck, and the pipeline takes any width from the configs.
`control_latents` rebuilds, for a whole batch, the VACE conditioning that `WanVACEPipeline` builds one clip at a
time (`prepare_video_latents` + `prepare_masks`); a test holds the two equal, so training sees what inference
feeds the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hetcache.pipeline import tiny_text_encoder, tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanVACEPipeline

# Native clip size of the proxy: 17 frames of 256x256 (5 x 16 x 16 = 1,280 tokens).
FRAMES, HEIGHT, WIDTH = 17, 256, 256

VAE_CONFIG = {
    "base_dim": 24,
    "z_dim": 32,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}

TRANSFORMER_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 32,
    "out_channels": 32,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 1024,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "vace_layers": [0, 2, 4, 6],
    "vace_in_channels": 2 * 32 + 64,  # kept and masked latents, and the 8x8 mask cells
}

# The proxy learns no language: it is trained with these prompts at random, so any prompt works and none steers it.
TRAINING_PROMPTS = ("", "an empty road", "remove the object", "background", "fill the masked region")


def build_proxy_pipeline(seed: int = 0) -> WanVACEPipeline:
    """An untrained proxy pipeline (float32, CPU): the starting point of training and the template of loading.

    The text encoder and tokenizer are the tiny models' (random, frozen, seeded): the proxy ships them as they
    are built here, so a prompt's embedding is the same at training and at inference.
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(len(tokenizer))
        vae = AutoencoderKLWan(**VAE_CONFIG)
        transformer = WanVACETransformer3DModel(**TRANSFORMER_CONFIG)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanVACEPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    for module in (text_encoder, vae, transformer):
        module.eval().requires_grad_(False)
    return pipe


def _latent_stats(vae: AutoencoderKLWan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(shape)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(shape)
    return mean, inverse_std


def encode(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents of `video` [B, 3, F, H, W] as the pipeline computes them (posterior mode, float32)."""
    mean, inverse_std = _latent_stats(vae, video.device)
    latents = vae.encode(video.to(vae.dtype)).latent_dist.mode()
    return (latents.float() - mean) * inverse_std


def decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from normalised latents, as the pipeline's last step computes them."""
    mean, inverse_std = _latent_stats(vae, latents.device)
    return vae.decode((latents / inverse_std + mean).to(vae.dtype)).sample


def latent_mask(mask: torch.Tensor, patch: int = 2, spatial: int = 8, temporal: int = 4) -> torch.Tensor:
    """The pipeline's mask channels: pixel mask [B, 1, F, H, W] -> [B, spatial^2, F', H/spatial, W/spatial].

    Each 8x8 pixel cell becomes 64 channels; frames are resampled to the latent count (nearest-exact).
    """
    batch, _, frames, height, width = mask.shape
    new_frames = (frames + temporal - 1) // temporal
    new_height = height // (spatial * patch) * patch
    new_width = width // (spatial * patch) * patch
    cells = mask[:, 0].float().view(batch, frames, new_height, spatial, new_width, spatial)
    cells = cells.permute(0, 3, 5, 1, 2, 4).flatten(1, 2)
    return torch.nn.functional.interpolate(cells, size=(new_frames, new_height, new_width), mode="nearest-exact")


def control_latents(vae: AutoencoderKLWan, video: torch.Tensor, mask: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """VACE conditioning [B, 2 z + 64, F', h, w] for `video` [B, 3, F, H, W] in [-1, 1] and bool `mask` [B, 1, F, H, W]:
    latents of the kept part, latents of the masked part, and the mask channels."""
    hidden = mask.to(video.dtype)
    inactive = encode(vae, video * (1 - hidden))
    reactive = encode(vae, video * hidden)
    spatial = 2 ** len(vae.temperal_downsample)
    temporal = 2 ** sum(vae.temperal_downsample)
    return torch.cat([inactive, reactive, latent_mask(mask, patch, spatial, temporal)], dim=1)
