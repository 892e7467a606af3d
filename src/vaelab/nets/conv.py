"""Convolutional encoder/decoder: one stride-2 stage per entry of ``widths``.

Spatial sizes are computed from the input shape, never hard-coded: a 3x3 stride-2 convolution
with padding 1 maps n to ceil(n / 2), and the decoder's transposed convolutions pick their output
padding so that they retrace those sizes exactly (28 -> 14 -> 7 -> 4 and back to 28).
"""

from __future__ import annotations

from torch import Tensor, nn


def _down_sizes(n: int, stages: int) -> list[int]:
    """[n, ceil(n/2), ceil(n/4), ...] with ``stages`` halvings."""
    sizes = [n]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))


class ConvEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], widths: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        c, h, w = shape
        stages = []
        for width in widths:
            stages.append(_block(nn.Conv2d(c, width, 3, stride=2, padding=1), width))
            c = width
        self.features = nn.Sequential(*stages)
        hs, ws = _down_sizes(h, len(widths))[-1], _down_sizes(w, len(widths))[-1]
        self.head = nn.Linear(c * hs * ws, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))  # (B, C, H, W) -> (B, out_dim)


class ConvDecoder(nn.Module):
    def __init__(
        self, shape: tuple[int, int, int], widths: tuple[int, ...], latent_dim: int
    ) -> None:
        super().__init__()
        c, h, w = shape
        hs, ws = _down_sizes(h, len(widths)), _down_sizes(w, len(widths))
        self.start = (widths[-1], hs[-1], ws[-1])
        self.project = nn.Linear(latent_dim, widths[-1] * hs[-1] * ws[-1])
        stages = []
        # Stage i goes from size sizes[i+1] to sizes[i]; a transposed 3x3 stride-2 conv with
        # padding 1 gives 2n - 1 + output_padding, so output_padding is 1 for even targets.
        outs = [*reversed(widths[:-1]), widths[0]]
        cin = widths[-1]
        for i, cout in zip(reversed(range(len(widths))), outs, strict=True):
            pad = (hs[i] - (2 * hs[i + 1] - 1), ws[i] - (2 * ws[i + 1] - 1))
            up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=pad)
            stages.append(_block(up, cout))
            cin = cout
        self.features = nn.Sequential(*stages)
        self.out = nn.Conv2d(cin, c, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], *self.start)  # (B, d) -> (B, C', H', W')
        return self.out(self.features(h))  # logits, (B, C, H, W)
