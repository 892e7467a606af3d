"""The Inception-v3 network of FID, for the user's own copy of its weights (never downloaded).

FID as published (Heusel et al. 2017) uses the 2048 values of the last average pooling of
TensorFlow's Inception-v3 of 2015-12-05. pytorch-fid ported those weights to PyTorch as
``pt_inception-2015-12-05-6726825d.pth``: a state dict of torchvision's ``Inception3`` layout
(1008 classes, no auxiliary classifier) for a network that differs from torchvision's in its
mixed blocks, where TensorFlow's graph differs: the average pooling of the A, C and E blocks
leaves the zero padding out of its means (``count_include_pad=False``), and the last E block
(``Mixed_7c``) pools its fourth branch with a maximum. This module is that network, written
for vaelab with the parameter names of that file, so that the file loads with strict key
checks; ``fc`` is there only so that it does (the features stop before it).

Input as FID takes it: images in [0, 1], grey repeated to three channels, resized bilinearly
to 299 x 299, scaled to [-1, 1].
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from vaelab.checkpoint import CheckpointError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release file
PUBLISHED_SHA256_PREFIX = "6726825d"  # the start of its sha256, as torch.hub checks it
SIZE = 299  # the input side the weights were trained at
FEATURES = 2048  # the pool features
CLASSES = 1008  # the logits of the 2015 graph (unused here, but in the file)
SUFFIXES = (".pth", ".pt", ".safetensors")


class FrozenBatchNorm(nn.Module):
    """Batch norm as evaluated: (x - running_mean) / sqrt(running_var + 0.001) * weight + bias
    (TensorFlow's epsilon). The network is never trained, so there is no step counter: the state
    dict holds exactly the file's four tensors per layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 0.001
        )


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = FrozenBatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _mean_pool(x: Tensor) -> Tensor:
    # TensorFlow's 3x3 average pooling with SAME padding divides by the pixels inside the image.
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | mean pool, 1x1 (``pool`` channels)."""

    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 224 + pool, H, W)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_mean_pool(x))], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3 stride 2 | 1x1, 3x3, 3x3 stride 2 | max pool stride 2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, 480 + cin, H', W')
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``mid`` channels inside)."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, mid, 1)
        self.branch7x7_2 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(mid, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(mid, mid, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(mid, mid, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(mid, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 768, H, W)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d7 = conv(d7)
        d7 = self.branch7x7dbl_5(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_mean_pool(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1, 3x3 stride 2 | 1x1, 1x7, 7x1, 3x3 stride 2 | max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, 512 + cin, H', W')
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    """8x8 block with the 3x3 convolutions split into parallel 1x3 and 3x1; its pool branch
    takes means (``max_pool=False``, Mixed_7b) or maxima (``max_pool=True``, Mixed_7c, as in
    the 2015 graph)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2048, H, W)
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _mean_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


class InceptionV3(nn.Module):
    """FID's Inception-v3 up to its 2048 pool features (attribute names: the weights file's)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool=32)
        self.Mixed_5c = BlockA(256, pool=64)
        self.Mixed_5d = BlockA(288, pool=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, mid=128)
        self.Mixed_6c = BlockC(768, mid=160)
        self.Mixed_6d = BlockC(768, mid=160)
        self.Mixed_6e = BlockC(768, mid=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, CLASSES)  # in the file; not used for features

    def forward(self, x: Tensor) -> Tensor:
        """Pool features (B, 2048) of images (B, 3, H, W) already scaled to [-1, 1]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):  # fmt: skip
            x = block(x)  # ends at (B, 2048, 8, 8)
        return x.mean((2, 3))


def prepare(images: Tensor) -> Tensor:
    """Images (B, C, H, W) in [0, 1] (C = 1 or 3) as the network takes them: three channels,
    resized bilinearly to ``SIZE`` x ``SIZE``, scaled to [-1, 1] (as pytorch-fid does)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.no_grad()
def features(net: InceptionV3, images: Tensor, batch: int = 16) -> np.ndarray:
    """The pool features (n, 2048), float64, of images (n, C, H, W) in [0, 1], in eval mode."""
    net.eval()
    out = [net(prepare(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file: what ties an Inception FID to the weights it was measured
    with (pytorch-fid's file starts with ``PUBLISHED_SHA256_PREFIX``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _few(names: list[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def load(path: str | Path) -> InceptionV3:
    """The network with the weights of ``path`` (a ``.pth``/``.pt`` state dict, read with
    ``torch.load(weights_only=True)``: tensors only, no other object is ever unpickled; or a
    ``.safetensors`` file), in eval mode. Raises ``CheckpointError`` (one line naming the file)
    for a missing file, a file that is not a state dict of tensors, missing or unexpected keys,
    or tensors of the wrong shape."""
    path = Path(path)
    expected = (
        f"expected the FID Inception-v3 weights (pytorch-fid's {WEIGHTS_NAME}) as a "
        f"{'/'.join(SUFFIXES)} file"
    )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {expected}")
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"{path}: unknown file type {path.suffix!r}; {expected}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():  # a refused file gets its own one-line error
                warnings.simplefilter("ignore")
                state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # arbitrary bytes make the unpickler raise anything
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: holds objects other than tensors ({found.group(1)}), which vaelab does "
                f"not unpickle (torch.load weights_only=True); {expected}"
            ) from None
        # torch's weights-only refusals are paragraphs: keep the sentence that says why.
        text = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        why = " ".join(text.split())
        why = f"{type(err).__name__}: {why}" if why else type(err).__name__
        raise CheckpointError(
            f"{path}: not readable as a state dict ({why[:160]}); {expected}"
        ) from None
    if not isinstance(state, dict):
        got = type(state).__name__
        raise CheckpointError(f"{path}: holds a {got}, not a state dict; {expected}")
    odd = [f"{k!r}: {type(v).__name__}" for k, v in state.items()
           if not (isinstance(k, str) and isinstance(v, Tensor))]  # fmt: skip
    if odd:
        raise CheckpointError(f"{path}: a dict with non-tensor entries ({_few(odd)}); {expected}")
    # torchvision's batch norms count their training steps; such a counter means nothing here.
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    with torch.device("meta"):  # shapes only: no random initialisation to overwrite
        net = InceptionV3()
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s) ({_few(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})"] if unexpected else []
        raise CheckpointError(f"{path}: {', '.join(parts)}; {expected}")
    wrong = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in want.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape: {_few(wrong)}; {expected}")
    net.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return net.eval()


__all__ = ["InceptionV3", "features", "load", "prepare", "sha256"]


@dataclass(frozen=True)
class Weights:
    """The network of a weights file with the file's name and sha256: read and hashed once for
    every run a ``vaelab quality`` call measures, which also computes the features of the same
    real images once for all its runs (``features(..., remember=True)``)."""

    net: InceptionV3
    file: str
    sha256: str
    remembered: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def features(self, images: Tensor, remember: bool = False) -> np.ndarray:
        """``features(self.net, images)``; with ``remember``, kept and given again for the same
        images (the same shape and bytes): the real images several runs share."""
        if not remember:
            return features(self.net, images)
        x = images.detach().cpu().contiguous()
        key = hashlib.sha256(str((tuple(x.shape), x.dtype)).encode())
        key.update(memoryview(x.numpy()).cast("B"))  # the bytes in place, not a copy
        digest = key.hexdigest()
        if digest not in self.remembered:
            self.remembered[digest] = features(self.net, images)
        return self.remembered[digest]


def open_weights(path: str | Path) -> Weights:
    """``load`` and ``sha256`` of ``path``, together."""
    return Weights(load(path), str(path), sha256(path))
