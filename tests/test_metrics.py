"""Fidelity metrics on hand-made frames: exact PSNR, SSIM bounds, region handling, the margin band, LPIPS loading."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from hetcache.errors import UserError
from hetcache.metrics import (
    FIDELITY_KEYS,
    I3D,
    LPIPS,
    band,
    clip_windows,
    fidelity,
    frechet_distance,
    kid,
    min_vfid_clips,
    psnr,
    psnr_per_frame,
    ssim,
    temporal_consistency,
    vfid,
)
from hetcache.networks import I3D_FEATURES, I3DNetwork, LPIPSNetwork


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
    assert tuple(scores) == FIDELITY_KEYS == (
        "psnr_frame", "psnr_mask", "psnr_band", "psnr_frame_per_frame", "psnr_mask_per_frame", "psnr_band_per_frame",
        "ssim_frame", "ssim_mask", "ssim_band", "lpips", "lpips_mask")
    assert scores["lpips"] is None and scores["lpips_mask"] is None
    assert scores["psnr_mask"] == pytest.approx(psnr(a, b, mask))
    assert scores["psnr_band"] == pytest.approx(psnr(a, b, band(mask, 4)))
    assert scores["psnr_mask_per_frame"] == pytest.approx(psnr_per_frame(a, b, mask))


def test_per_frame_psnr_is_the_mean_of_each_frames_psnr():
    a = frames(100, shape=(3, 8, 8))
    b = a.copy()
    b[0] += 10  # frame 0: every value off by 10
    b[1, :4] += 20  # frame 1: half the pixels off by 20 (MSE = 200 / 255^2)
    b[2, 0, 0, 0] += 1  # frame 2: one value off by 1 of 8 * 8 * 3
    per_frame = [20 * math.log10(255 / 10), 10 * math.log10(255**2 / 200), 10 * math.log10(255**2 * 192)]
    assert psnr_per_frame(a, b) == pytest.approx(sum(per_frame) / 3, abs=1e-9)
    pooled_mse = (64 * 3 * 100 + 32 * 3 * 400 + 1) / (3 * 64 * 3 * 255**2)
    assert psnr(a, b) == pytest.approx(-10 * math.log10(pooled_mse), abs=1e-9)  # pooled: the first frame dominates
    region = np.zeros(a.shape[:3], dtype=bool)
    region[1, :4] = True  # only frame 1 has region pixels, all of them off by 20
    assert psnr_per_frame(a, b, region) == pytest.approx(20 * math.log10(255 / 20), abs=1e-9)
    assert psnr_per_frame(a, a) == math.inf and psnr_per_frame(a, b, np.zeros_like(region)) is None
    c = a.copy()
    c[1] += 10  # frames 0 and 2 identical: they count at one level off in one value of 8 * 8 pixels
    ceiling = 10 * math.log10(3 * 64 * 255**2)
    assert psnr_per_frame(a, c) == pytest.approx((2 * ceiling + 20 * math.log10(255 / 10)) / 3, abs=1e-9)


class MeanAbs(torch.nn.Module):
    """A stand-in LPIPS network: one full-resolution map, the mean absolute difference over channels."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [(x - y).abs().mean(dim=1, keepdim=True)]


class TwoMaps(MeanAbs):
    """MeanAbs plus a constant half-resolution map of 0.5 (upsampling a constant map keeps it constant)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        half = torch.full((len(x), 1, x.shape[2] // 2, x.shape[3] // 2), 0.5)
        return [*super().forward(x, y), half]


def test_lpips_averages_the_distance_over_frames():
    model = LPIPS(MeanAbs())
    a, b = frames(100), frames(110)
    assert model(a, b) == pytest.approx(2 * 10 / 255, abs=1e-6)  # [-1, 1] scale doubles the difference
    assert model(a, a) == 0.0


def test_masked_lpips_averages_the_per_pixel_map_over_the_mask_in_each_frame():
    a = frames(100, shape=(2, 8, 8))
    b = a.copy()
    b[0, :4] = 110  # frame 0: the top half off by 10
    b[1] = 130  # frame 1: everything off by 30
    region = np.zeros(a.shape[:3], dtype=bool)
    region[0, :4, :2] = True  # 8 pixels, all inside the changed half
    region[0, 6:, :2] = True  # 4 unchanged pixels
    region[1, 0, 0] = True
    frame_0 = (8 * 20 / 255 + 4 * 0) / 12  # [-1, 1] scale: 10 levels are 20/255
    frame_1 = 60 / 255
    whole, masked = LPIPS(MeanAbs()).scores(a, b, region)
    assert masked == pytest.approx((frame_0 + frame_1) / 2, abs=1e-7)  # float32 frames
    assert whole == pytest.approx((20 / 255 / 2 + 60 / 255) / 2, abs=1e-7)
    whole, masked = LPIPS(TwoMaps()).scores(a, b, region)
    assert masked == pytest.approx((frame_0 + frame_1) / 2 + 0.5, abs=1e-7)
    assert whole == pytest.approx((20 / 255 / 2 + 60 / 255) / 2 + 0.5, abs=1e-7)
    empty = np.zeros_like(region)
    assert LPIPS(MeanAbs()).scores(a, b, empty)[1] is None and LPIPS(MeanAbs()).scores(a, b, None)[1] is None


@pytest.mark.parametrize("backbone", ["alex", "vgg"])
def test_lpips_weights_load_as_a_state_dict(tmp_path, backbone):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = LPIPSNetwork(backbone)
    with torch.no_grad():
        for number in range(5):
            getattr(network, f"lin{number}").model[1].weight.uniform_(0, 1)
    state = network.state_dict()
    # the lpips package's state dict also holds its input scaling and a second view of the linear layers
    extra = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1), "lins.0.model.1.weight": state["lin0.model.1.weight"]}
    torch.save({**state, **extra}, tmp_path / "lpips.pth")
    save_file(state, str(tmp_path / "lpips.safetensors"))
    a, b = noisy(0, shape=(2, 64, 64)), noisy(1, shape=(2, 64, 64))
    expected = LPIPS(network).scores(a, b, None)[0]
    for name in ("lpips.pth", "lpips.safetensors"):
        model = LPIPS.from_file(tmp_path / name)
        assert model(a, b) == pytest.approx(expected, rel=1e-6) and model(a, b) > 0 and model(a, a) == 0.0


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("loader", [LPIPS.from_file, I3D.from_file])
def test_weight_files_that_are_not_state_dicts_are_refused(tmp_path, loader):
    with pytest.raises(UserError, match="not found"):
        loader(tmp_path / "nope.pt")
    cases = {
        "tensor.pt": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state dict"),
        "module.pt": (lambda p: torch.save(Tiny(), p), "is not a .* state dict"),  # a pickled object
        "script.pt": (lambda p: torch.jit.save(torch.jit.script(Tiny()), str(p)), "is a TorchScript file"),
        "other.pt": (lambda p: torch.save(Tiny().state_dict(), p), "not a state dict of hetcache's"),
        "text.safetensors": (lambda p: p.write_text("nonsense"), "is not a .* state dict"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(UserError, match=message) as caught:
            loader(path)
        assert "\n" not in str(caught.value), name


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ"):
        psnr(noisy(0), noisy(0, shape=(2, 32, 48)))


# ------------------------------------------------------------------------------------------------ temporal
def ramp(values, shape=(16, 24)) -> np.ndarray:
    """One constant frame per value."""
    return np.stack([np.full((*shape, 3), v, dtype=np.uint8) for v in values])


def test_temporal_consistency_of_identical_videos_is_zero():
    video = noisy(5)
    assert temporal_consistency(video, video) == {"temporal": 0.0, "flicker": 0.0}


def test_temporal_consistency_measures_change_against_the_reference():
    target = ramp([100, 110, 120])  # moves 10 levels per frame
    frozen = ramp([100, 100, 100])
    assert temporal_consistency(frozen, target) == {"temporal": 10.0, "flicker": -10.0}
    jumpy = ramp([100, 130, 100])  # |D| = 30 per pair; D - D_ref = 20, then -40
    assert temporal_consistency(jumpy, target) == {"temporal": 30.0, "flicker": 20.0}


def test_temporal_consistency_counts_only_the_region():
    target = ramp([100, 110, 120])
    pred = target.copy()
    pred[:, :, 12:] = 0  # wrong but static outside the region
    region = np.zeros(pred.shape[:3], dtype=bool)
    region[:, :, :12] = True
    assert temporal_consistency(pred, target, region) == {"temporal": 0.0, "flicker": 0.0}
    assert temporal_consistency(pred, target)["temporal"] == pytest.approx(5.0)  # half the pixels off by 10
    assert temporal_consistency(pred[:1], target[:1]) == {"temporal": None, "flicker": None}
    empty = np.zeros_like(region)
    assert temporal_consistency(pred, target, empty) == {"temporal": None, "flicker": None}


# ------------------------------------------------------------------------------------------------ VFID
def test_clip_windows_cover_the_video_at_half_overlap():
    assert clip_windows(81) == [slice(s, s + 16) for s in range(0, 66, 8)]
    assert clip_windows(9) == [slice(0, 9)]
    assert clip_windows(16) == [slice(0, 16)]
    assert clip_windows(17) == [slice(0, 16)]


def test_frechet_distance_of_known_gaussians():
    mu = np.array([1.0, -2.0, 0.5])
    sigma = np.diag([1.0, 4.0, 9.0])
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    other = np.diag([4.0, 1.0, 9.0])
    assert frechet_distance(mu, sigma, mu + 1, other) == pytest.approx(3.0 + 1.0 + 1.0 + 0.0, abs=1e-9)


def test_frechet_distance_with_non_commuting_covariances():
    a = np.array([[2.0, 0.6], [0.6, 1.0]])
    b = np.array([[1.0, -0.3], [-0.3, 3.0]])
    product = a @ b  # 2x2 with positive eigenvalues: tr sqrt(AB) = sqrt(tr AB + 2 sqrt(det A det B))
    cross = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    expected = 1.0 + np.trace(a) + np.trace(b) - 2 * cross
    assert frechet_distance(np.zeros(2), a, np.array([1.0, 0.0]), b) == pytest.approx(expected, abs=1e-9)


def test_vfid_estimates_the_distance_from_samples_and_refuses_too_few():
    rng = np.random.default_rng(0)
    first = rng.normal(0.0, 1.0, size=(40_000, 2))
    second = rng.normal(0.5, 2.0, size=(40_000, 2))
    assert vfid(first, second) == pytest.approx(2 * 0.25 + 2 * (2.0 - 1.0) ** 2, abs=0.05)
    assert min_vfid_clips(2) == 3
    assert vfid(first[:3], second[:3]) >= 0
    with pytest.raises(ValueError, match="at least 3 clips"):
        vfid(first[:2], second)


class ChannelMeans(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4))  # [B, 3, T, H, W] -> [B, 3]


class NoBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()


def test_i3d_gives_one_row_per_clip():
    model = I3D(ChannelMeans(), batch=2)
    video = frames(51, shape=(33, 20, 30))
    features = model(video)
    assert features.shape == (len(clip_windows(33)), 3) == (3, 3)
    assert np.allclose(features, 2 * 51 / 255 - 1, atol=1e-6)


def test_i3d_wrong_output_is_a_user_error():
    with pytest.raises(UserError, match=r"\[batch, dim\]"):
        I3D(NoBatch())(frames(10, shape=(5, 8, 8)))


def test_i3d_weights_load_as_a_state_dict_and_give_1024_features(tmp_path):
    torch.manual_seed(0)
    network = I3DNetwork()
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}  # old files
    state["logits.conv3d.weight"] = torch.zeros(400, 1024, 1, 1, 1)  # the classifier is ignored
    torch.save(state, tmp_path / "rgb_imagenet.pt")
    video = noisy(0, shape=(5, 32, 48))
    features = I3D.from_file(tmp_path / "rgb_imagenet.pt")(video)
    assert features.shape == (1, I3D_FEATURES) and np.isfinite(features).all()
    assert np.allclose(features, I3D(network)(video), atol=1e-6)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    x = np.array([[1.0], [2.0]])
    y = np.array([[0.0], [1.0], [3.0]])

    def k(a, b):
        return (a * b + 1) ** 3

    within_x = 2 * k(1, 2) / 2
    within_y = 2 * (k(0, 1) + k(0, 3) + k(1, 3)) / 6
    across = sum(k(a, b) for a in (1, 2) for b in (0, 1, 3)) / 6
    assert kid(x, y) == pytest.approx(within_x + within_y - 2 * across, abs=1e-9)
    assert kid(x, x) == pytest.approx(2 * k(1, 2) - 2 * (k(1, 1) + 2 * k(1, 2) + k(2, 2)) / 4, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 clips"):
        kid(x[:1], y)


class _RunsCode:
    """A pickle whose loading would run code: here, create a file (the issue's crafted file ran a shell command)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


@pytest.mark.parametrize("loader", [LPIPS.from_file, I3D.from_file])
def test_a_crafted_weights_file_runs_no_code(tmp_path, loader):
    marker = tmp_path / "code-ran"
    torch.save({"weight": _RunsCode(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(UserError, match="is not a .* state dict"):
        loader(tmp_path / "crafted.pt")
    assert not marker.exists()
    torch.load(tmp_path / "crafted.pt", weights_only=False)  # what an unpickling loader would have done
    assert marker.exists()
