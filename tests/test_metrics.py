"""Fidelity metrics on hand-made frames: exact PSNR, SSIM bounds, region handling, the margin band, LPIPS loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from hetcache.errors import UserError
from hetcache.metrics import LPIPS, band, fidelity, psnr, ssim


def frames(value: int = 100, shape=(3, 32, 48)) -> np.ndarray:
    return np.full((*shape, 3), value, dtype=np.uint8)


def noisy(seed: int = 0, shape=(3, 32, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def test_identical_frames_give_infinite_psnr_and_unit_ssim():
    video = noisy()
    assert psnr(video, video) == math.inf
    assert ssim(video, video) == pytest.approx(1.0, abs=1e-6)


def test_known_mse_gives_known_psnr():
    a, b = frames(100), frames(110)  # every value off by 10: MSE = (10/255)^2
    assert psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=1e-12)


def test_whole_frame_metrics_match_torchmetrics():
    a, b = noisy(0), noisy(1)
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).double() / 255
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).double() / 255
    assert psnr(a, b) == pytest.approx(float(peak_signal_noise_ratio(ta, tb, data_range=1.0)), abs=1e-5)
    expected = float(structural_similarity_index_measure(ta.float(), tb.float(), data_range=1.0))
    assert ssim(a, b) == pytest.approx(expected, abs=1e-5)


def test_region_ignores_changes_outside_it():
    a = noisy(0)
    b = a.copy()
    region = np.zeros(a.shape[:3], dtype=bool)
    region[:, :, :16] = True
    b[:, :, 16:] = 255 - b[:, :, 16:]
    assert psnr(a, b, region) == math.inf
    assert psnr(a, b) < 20
    b[0, 0, 0, 0] ^= 1  # one unit of error inside: MSE = 1 / (count * 3 * 255^2)
    count = int(region.sum())
    assert psnr(a, b, region) == pytest.approx(10 * math.log10(count * 3 * 255**2), abs=1e-9)


def test_masked_ssim_is_the_mean_of_the_map_over_the_region():
    a, b = noisy(0), noisy(2)
    region = np.zeros(a.shape[:3], dtype=bool)
    region[:, 4:20, 10:30] = True
    ta = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    tb = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
    _, full = structural_similarity_index_measure(ta, tb, data_range=1.0, return_full_image=True, reduction="none")
    expected = float(full.double().mean(dim=1)[torch.from_numpy(region)].mean())
    assert ssim(a, b, region) == pytest.approx(expected, abs=1e-9)


def test_empty_region_gives_none():
    a, b = noisy(0), noisy(1)
    empty = np.zeros(a.shape[:3], dtype=bool)
    assert psnr(a, b, empty) is None
    assert ssim(a, b, empty) is None


def test_band_is_the_dilation_minus_the_mask():
    mask = np.zeros((2, 40, 40), dtype=bool)
    mask[:, 10:20, 10:20] = True
    ring = band(mask, 3)
    expected = np.zeros_like(mask)
    expected[:, 7:23, 7:23] = True
    expected &= ~mask
    assert np.array_equal(ring, expected)
    assert not band(np.ones((1, 8, 8), dtype=bool), 3).any()


def test_fidelity_reports_every_region():
    a, b = noisy(0), noisy(3)
    mask = np.zeros(a.shape[:3], dtype=bool)
    mask[:, 8:24, 8:24] = True
    scores = fidelity(a, b, mask, band_px=4)
    assert set(scores) == {"psnr_frame", "psnr_mask", "psnr_band", "ssim_frame", "ssim_mask", "ssim_band", "lpips"}
    assert scores["lpips"] is None
    assert scores["psnr_mask"] == pytest.approx(psnr(a, b, mask))
    assert scores["psnr_band"] == pytest.approx(psnr(a, b, band(mask, 4)))


class MeanAbs(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().mean(dim=(1, 2, 3))


def test_lpips_loads_a_torchscript_file(tmp_path):
    path = tmp_path / "lpips.pt"
    torch.jit.save(torch.jit.script(MeanAbs()), str(path))
    model = LPIPS(path)
    a, b = frames(100), frames(110)
    assert model(a, b) == pytest.approx(2 * 10 / 255, abs=1e-6)  # [-1, 1] scale doubles the difference
    assert model(a, a) == 0.0


def test_lpips_missing_or_wrong_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        LPIPS(tmp_path / "nope.pt")
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="not a module"):
        LPIPS(path)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ"):
        psnr(noisy(0), noisy(0, shape=(2, 32, 48)))
