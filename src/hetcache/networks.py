"""The networks behind LPIPS and the video-feature metrics (VFID, KID), defined here so that user weight files load
as state dicts into known code, never as pickled objects.

- `LPIPSNetwork`: LPIPS v0.1 (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric", CVPR 2018) on an AlexNet or VGG-16 backbone. Parameter names follow the `lpips` package's `LPIPS`
  module, so `lpips.LPIPS(net="alex").state_dict()` (backbone and linear layers) loads as it is.
- `I3DNetwork`: Inflated Inception-v1 (Carreira and Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017) with
  TensorFlow "SAME" padding. Parameter names follow the widely used PyTorch port's state dicts (e.g. its
  `rgb_imagenet.pt`: `Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_mean`, ...); its `logits.*`
  classifier is not needed for features and is ignored when present.

`load_network` reads a weights file (safetensors, or `torch.load(weights_only=True)`) and refuses anything that is
not a state dict of the network with a one-line `UserError`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hetcache.errors import UserError

# ------------------------------------------------------------------------------------------------ LPIPS
# Backbones as (layer list, the five slices' ends): convolutions (out, kernel, stride, padding), "relu" and
# ("pool", kernel, stride), in the order and numbering of torchvision's `features`, which the lpips package keeps.
_ALEX = [(64, 11, 4, 2), "relu", ("pool", 3, 2), (192, 5, 1, 2), "relu", ("pool", 3, 2), (384, 3, 1, 1), "relu",
         (256, 3, 1, 1), "relu", (256, 3, 1, 1), "relu"]
_VGG16 = [layer for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
          for layer in [(width, 3, 1, 1), "relu"] * convs + [("pool", 2, 2)]][:-1]  # LPIPS stops at relu5_3
BACKBONES = {"alex": (_ALEX, (2, 5, 8, 10, 12)), "vgg": (_VGG16, (4, 9, 16, 23, 30))}
# The lpips package's input scaling (its ScalingLayer): (x - shift) / scale for x in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _Slices(nn.Module):
    """The backbone cut after each of its five ReLU stages (`slice1` ... `slice5`)."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        layers, ends = BACKBONES[backbone]
        channels, start = 3, 0
        self.channels: list[int] = []
        for number, end in enumerate(ends, start=1):
            stage = nn.Sequential()
            for index in range(start, end):
                layer = layers[index]
                if layer == "relu":
                    module = nn.ReLU()
                elif layer[0] == "pool":
                    module = nn.MaxPool2d(layer[1], layer[2])
                else:
                    width, kernel, stride, padding = layer
                    module = nn.Conv2d(channels, width, kernel, stride, padding)
                    channels = width
                stage.add_module(str(index), module)
            setattr(self, f"slice{number}", stage)
            self.channels.append(channels)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class _Linear(nn.Module):
    """A non-negative 1x1 weighting of the channels (the lpips package's NetLinLayer: dropout, then a conv)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSNetwork(nn.Module):
    """LPIPS distance maps of two batches of frames in [-1, 1]: one map [B, 1, h_l, w_l] per backbone stage.

    The LPIPS distance of a frame is the sum over stages of each map's spatial mean; the per-pixel distance (the
    lpips package's `spatial=True`) is the sum of the maps upsampled bilinearly to the frame.
    """

    def __init__(self, backbone: str = "alex") -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _Slices(backbone)
        for number, channels in enumerate(self.net.channels):
            setattr(self, f"lin{number}", _Linear(channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        stages_x = self.net((x - self.shift) / self.scale)
        stages_y = self.net((y - self.shift) / self.scale)
        maps = []
        for number, (fx, fy) in enumerate(zip(stages_x, stages_y)):
            difference = (_unit(fx) - _unit(fy)) ** 2
            maps.append(getattr(self, f"lin{number}")(difference))
        return maps


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Features divided by their norm over channels (LPIPS's per-position normalisation)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


# ------------------------------------------------------------------------------------------------ I3D
def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one dimension: (before, after), the extra one after."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    pads = [_same_padding(size, k, s) for size, k, s in zip(x.shape[2:], kernel, stride)]
    return F.pad(x, [p for pair in reversed(pads) for p in pair])


class _Unit3D(nn.Module):
    """Conv3d (no bias), batch norm (eps 1e-3), ReLU, with "SAME" padding."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int | tuple[int, int, int] = 1,
                 stride: int | tuple[int, int, int] = 1) -> None:
        super().__init__()
        self.kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.stride = (stride,) * 3 if isinstance(stride, int) else stride
        self.conv3d = nn.Conv3d(channels_in, channels_out, self.kernel, self.stride, bias=False)
        self.bn = nn.BatchNorm3d(channels_out, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride))))


class _MaxPoolSame(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class _Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 then 3x3; 1x1 then 3x3; 3x3 max pool then 1x1."""

    def __init__(self, channels_in: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = _Unit3D(channels_in, widths[0])
        self.b1a = _Unit3D(channels_in, widths[1])
        self.b1b = _Unit3D(widths[1], widths[2], 3)
        self.b2a = _Unit3D(channels_in, widths[3])
        self.b2b = _Unit3D(widths[3], widths[4], 3)
        self.b3a = _MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = _Unit3D(channels_in, widths[5])
        self.channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# Inception-v1's mixed blocks (Szegedy et al. 2015, table 1): 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (3x3 in
# I3D), pool projection.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
          "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
_I3D_ORDER = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
              "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
              "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")
I3D_FEATURES = 1024


class I3DNetwork(nn.Module):
    """RGB I3D up to Mixed_5c: clips [B, 3, T, H, W] in [-1, 1] -> [B, 1024] features (the mean over the last
    block's time and space, i.e. global average pooling before the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        channels = 3
        for name in _I3D_ORDER:
            if name in _POOLS:
                layer: nn.Module = _MaxPoolSame(*_POOLS[name])
            elif name in _MIXED:
                layer = _Inception(channels, _MIXED[name])
                channels = layer.channels
            else:
                width, kernel, stride = {"Conv3d_1a_7x7": (64, 7, 2), "Conv3d_2b_1x1": (64, 1, 1),
                                         "Conv3d_2c_3x3": (192, 3, 1)}[name]
                layer = _Unit3D(channels, width, kernel, stride)
                channels = width
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in _I3D_ORDER:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3, 4))


# ------------------------------------------------------------------------------------------------ loading
IGNORED_PREFIXES = {
    LPIPSNetwork: ("lins.", "scaling_layer."),  # the lpips package's second view of the lin layers; constants
    I3DNetwork: ("logits.",),  # the classifier
}


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors (by suffix) or a `torch.save`d state dict read with
    `weights_only=True`. Anything else (a pickled module, TorchScript, a bare tensor) is a UserError; TorchScript
    archives are recognised before torch.load sees them (it would hand them to torch.jit.load)."""
    path = Path(path)
    advice = f"save the {what} weights as a state dict (torch.save(model.state_dict(), ...) or safetensors)"
    if not path.is_file():
        raise UserError(f"{what} weights file not found: {path}: {advice}")
    if _is_torchscript(path):
        raise UserError(f"{path} is a TorchScript file, not a {what} state dict: {advice}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any loading failure means the same thing to the user
        raise UserError(f"{path} is not a {what} state dict (a pickled object or an unreadable file): {advice}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: {advice}")
    return state


def _is_torchscript(path: Path) -> bool:
    """A zip archive with compiled code in it (`<name>/code/...`), as `torch.jit.save` writes."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_network(path: str | os.PathLike, kind: type[nn.Module], what: str,
                 device: str | torch.device = "cpu") -> nn.Module:
    """`kind` (LPIPSNetwork or I3DNetwork) with the weights of `path`, in eval mode on `device`."""
    state = read_state_dict(path, what)
    ignored = IGNORED_PREFIXES.get(kind, ())
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    network = kind(_backbone_of(state)) if kind is LPIPSNetwork else kind()
    expected = network.state_dict()
    # Batch-norm step counters only matter for training; files saved by old PyTorch versions lack them.
    state.update({k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problem = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                   f"unexpected keys (e.g. {unexpected[0]})" if unexpected else f"wrong shape of {wrong[0]}")
        raise UserError(f"{path} is not a state dict of hetcache's {kind.__name__}: {problem}: see docs/EVAL.md")
    network.load_state_dict(state)
    return network.to(device).eval()


def _backbone_of(state: dict[str, torch.Tensor]) -> str:
    """LPIPS's backbone from its first convolution: AlexNet's is 11x11, VGG's 3x3."""
    first = state.get("net.slice1.0.weight")
    return "vgg" if first is not None and first.shape[-1] == 3 else "alex"
