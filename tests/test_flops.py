import pytest
import torch
from diffusers import WanVACETransformer3DModel
from diffusers.models.attention_dispatch import attention_backend
from tiny_models import diffusers_test_transformer
from torch.utils.flop_counter import FlopCounterMode

from hetcache.flops import (
    ModelShape,
    block_flops,
    embed_flops,
    forward_flops,
    selection_flops,
    vace_block_flops,
)

WAN_VACE_1_3B_CONFIG = {
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "ffn_dim": 8960,
    "num_layers": 30,
    "vace_layers": list(range(0, 30, 2)),
    "text_dim": 4096,
    "in_channels": 16,
    "vace_in_channels": 96,
    "out_channels": 16,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
}


def tiny_transformer(num_layers: int, vace_layers: list[int]) -> WanVACETransformer3DModel:
    return diffusers_test_transformer(num_layers, tuple(vace_layers))


@pytest.mark.parametrize(("num_layers", "vace_layers"), [(3, [0, 2]), (4, [0, 3])])
def test_full_forward_matches_flop_counter(num_layers, vace_layers):
    model = tiny_transformer(num_layers, vace_layers)
    frames, height, width, text_len = 3, 8, 10, 7
    latents = torch.randn(1, 16, frames, height, width)
    control = torch.randn(1, 96, frames, height, width)
    text = torch.randn(1, text_len, 32)
    with torch.no_grad(), attention_backend("_native_math"), FlopCounterMode(display=False) as counter:
        model(latents, torch.tensor([500.0]), text, control_hidden_states=control)
    tokens = frames * (height // 2) * (width // 2)
    shape = ModelShape.from_config(model.config)
    analytic = forward_flops(shape, tokens, tokens, text_len, text_kv=True)
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_shape_from_config():
    shape = ModelShape.from_config(tiny_transformer(4, [0, 3]).config)
    assert shape == ModelShape(
        dim=24,
        heads=2,
        ffn_dim=32,
        num_layers=4,
        num_vace_layers=2,
        text_dim=32,
        in_channels=16,
        vace_in_channels=96,
        out_channels=16,
        patch_size=(1, 2, 2),
        freq_dim=256,
    )


def test_wan_vace_1_3b_forward_is_about_110_tflop():
    shape = ModelShape.from_config(WAN_VACE_1_3B_CONFIG)
    assert (shape.dim, shape.num_vace_layers) == (1536, 15)
    tokens = 9 * 30 * 52
    blocks_only = 45 * block_flops(shape, tokens, tokens, 512, text_kv=True)
    assert blocks_only == pytest.approx(109.4e12, rel=0.002)
    full = forward_flops(shape, tokens, tokens, 512, text_kv=True)
    assert 109e12 < full < 111e12


def test_step_kinds_and_terms():
    shape = ModelShape.from_config(WAN_VACE_1_3B_CONFIG)
    d, tokens, text_len = shape.dim, 14040, 512
    reuse = forward_flops(shape, tokens, 0, text_len, text_kv=True)
    patch, time_mlp = 2 * tokens * d * 4 * 16, 2 * 256 * d + 2 * d * d
    assert reuse == patch + time_mlp + 2 * tokens * d * 16 * 4  # latent patches, time MLP, head
    assert reuse < 0.2 * embed_flops(shape, tokens, text_len)
    with_kv = block_flops(shape, 100, tokens, text_len, text_kv=True)
    assert with_kv - block_flops(shape, 100, tokens, text_len, text_kv=False) == 4 * text_len * d * d
    first = vace_block_flops(shape, 100, tokens, text_len, text_kv=False, first=True)
    later = vace_block_flops(shape, 100, tokens, text_len, text_kv=False, first=False)
    assert first - later == 2 * 100 * d * d
    assert later - block_flops(shape, 100, tokens, text_len, text_kv=False) == 2 * 100 * d * d
    full = forward_flops(shape, tokens, tokens, text_len, text_kv=False)
    partial = forward_flops(shape, tokens, tokens // 4, text_len, text_kv=False)
    assert embed_flops(shape, tokens, text_len) < partial < full


def test_selection_flops_count():
    shape = ModelShape.from_config(WAN_VACE_1_3B_CONFIG)
    flops = selection_flops(shape, 14040, 3000, 9000, clusters=16, iters=5)
    assert flops == 4 * 3000 * 14040 * 1536 + (2 * 5 + 1) * 2 * 9000 * 16 * 1536
    assert selection_flops(shape, 14040, 0, 16, clusters=16, iters=5) == 0.0
