"""Convolutional encoder/decoder: one stride-2 stage per entry of ``widths``.

Spatial sizes are computed from the input shape, never hard-coded: a 3x3 stride-2 convolution
with padding 1 maps n to ceil(n / 2), and the decoder retraces those sizes exactly (28 -> 14 ->
7 -> 4 and back to 28) in one of two ways (``model.upsample``):

- ``transpose``: 3x3 stride-2 transposed convolutions, their output padding picked per stage.
  Where the kernel's taps overlap unevenly (a 3x3 kernel at stride 2 gives even output pixels
  one tap per axis and odd ones two), the output carries a 2x2 checkerboard pattern (Odena et
  al. 2016, "Deconvolution and Checkerboard Artifacts", Distill).
- ``resize``: nearest-neighbour resize to the stage's size, then a 3x3 stride-1 convolution:
  every output pixel sees the same number of taps, so no pattern is built in. It costs about 4x
  the multiply-adds of the transposed stage (the convolution runs at the larger size).
"""

from __future__ import annotations

from torch import Tensor, nn

UPSAMPLE = ("transpose", "resize")


def _down_sizes(n: int, stages: int) -> list[int]:
    """[n, ceil(n/2), ceil(n/4), ...] with ``stages`` halvings."""
    sizes = [n]
    for _ in range(stages):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _block(conv: nn.Module, channels: int, before: tuple[nn.Module, ...] = ()) -> nn.Sequential:
    return nn.Sequential(*before, conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))


def _up_block(
    upsample: str, cin: int, cout: int, small: tuple[int, int], large: tuple[int, int]
) -> nn.Sequential:
    """One decoder stage, from (cin, *small) to (cout, *large), large = 2 * small or one less."""
    if upsample == "resize":
        # "nearest" takes source pixel floor(i * n / m) for output pixel i: floor(i / 2) both for
        # m = 2n and for m = 2n - 1, the pixel whose position the encoder's stride-2 convolution
        # sampled. (Inside the Sequential the resize comes first, so the convolution's parameter
        # names differ from the transposed stage's: a run never loads into the other decoder.)
        resize = nn.Upsample(size=large, mode="nearest")
        return _block(nn.Conv2d(cin, cout, 3, padding=1), cout, before=(resize,))
    # A transposed 3x3 stride-2 conv with padding 1 gives 2n - 1 + output_padding, so
    # output_padding is 1 for even targets.
    pad = (large[0] - (2 * small[0] - 1), large[1] - (2 * small[1] - 1))
    return _block(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=pad), cout)


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
        self,
        shape: tuple[int, int, int],
        widths: tuple[int, ...],
        latent_dim: int,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE:
            raise ValueError(f"upsample: expected one of {UPSAMPLE}, got {upsample!r}")
        c, h, w = shape
        hs, ws = _down_sizes(h, len(widths)), _down_sizes(w, len(widths))
        self.start = (widths[-1], hs[-1], ws[-1])
        self.project = nn.Linear(latent_dim, widths[-1] * hs[-1] * ws[-1])
        stages = []
        outs = [*reversed(widths[:-1]), widths[0]]
        cin = widths[-1]
        for i, cout in zip(reversed(range(len(widths))), outs, strict=True):
            # stage i goes from size sizes[i+1] to sizes[i]
            small, large = (hs[i + 1], ws[i + 1]), (hs[i], ws[i])
            stages.append(_up_block(upsample, cin, cout, small, large))
            cin = cout
        self.features = nn.Sequential(*stages)
        self.out = nn.Conv2d(cin, c, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], *self.start)  # (B, d) -> (B, C', H', W')
        return self.out(self.features(h))  # logits, (B, C, H, W)
