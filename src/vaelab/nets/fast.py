"""Faster CPU computations of the conv networks' layers: the same parameters and the same
results up to rounding, so checkpoints and ``state_dict`` keys do not change.

``speed_up(model)`` swaps the class of each ``nn.Conv2d`` and ``nn.ConvTranspose2d`` for a
subclass that only overrides ``forward`` (as ``SyncBatchNorm.convert_sync_batchnorm`` swaps batch
norms). Each call picks its path from the input; anything a fast path does not cover (a CUDA
tensor, groups, dilation) takes torch's own. The trainer applies it when ``train.fast_layers`` is
on. Measured on 2 cores, CelebA-64 network, batch 64, bf16 (benchmarks/throughput.py):

- Transposed convolutions: torch's CPU ``convolution_backward`` computes the bias gradient (the
  sum of the output gradient over batch and pixels) about ten times slower than a plain sum:
  21 ms of the 31 ms backward of the decoder's last 32 -> 32 channel layer. Here the backward
  asks ``convolution_backward`` for the input and weight gradients only and sums the bias
  gradient itself (in bf16, torch accumulates in fp32 and rounds once, as oneDNN does).
- 3x3 stride-2 convolutions over a few pixels (the encoder's 4x4 -> 2x2 and the decoder's
  2x2 -> 4x4 layers, 256 and 512 channels): oneDNN runs them at about a quarter of the matmul
  peak. Here they are one matrix product over the kernel taps (im2col: at most ``FEW_PIXELS``
  positions per image, so the unfolded input is small): 1.3-1.5x faster, forward and backward,
  measured alone in bf16. Other geometries take torch's path (not measured faster).
- Stride-1 convolutions with at most ``FEW_CHANNELS`` outputs and a channels-last input (the
  output layer, 32 -> 3 channels at 64x64): the weight gradient is a matrix product over the
  taps of the output gradient (``_ConvFewOutputsBackward``). With AVX-512 (``WIDE_VECTORS``)
  oneDNN pads the 3 output channels to 16: there the forward computes 2x2 output pixels at
  once (``_conv_in_blocks``, 12 channels; 4.6 ms in the bf16 step, was 6.6) and the input
  gradient is a matrix product too (the backward 6.5 ms, was about 17). With AVX2 (8 lanes) the
  blocks and that input gradient cost more than torch's (fp32, batch 64, AMD EPYC Zen 3:
  forward 11.0 ms against 8.9, input gradient 5.6 against 3.0), so there both are torch's and
  only the weight gradient is vaelab's (6.3 ms plus 1.7 to gather the taps, against 17.4).

``speed_up`` also makes each LeakyReLU right after a batch norm work in place.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

FEW_PIXELS = 4  # a 3x3 stride-2 convolution whose small side (its output; a transposed one's
# input) has at most this many pixels per image and channel is one matrix product (measured
# faster there; the other side then has at most 4 x FEW_PIXELS)
FEW_CHANNELS = 4  # a stride-1 convolution with at most this many output channels (an image's
# colours) has its weight gradient over the output gradient's taps (and, with WIDE_VECTORS, is
# computed in 2x2 blocks)
# AVX-512: oneDNN pads a convolution's few output channels to 16 (fp32 lanes; bf16 too)
WIDE_VECTORS = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _plain(layer: nn.Conv2d | nn.ConvTranspose2d, x: Tensor) -> bool:
    """The layers the fast paths cover: 2-d on a CPU, dense, no dilation, zero padding."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] > 0
        and layer.groups == 1
        and layer.dilation == (1, 1)
        and layer.padding_mode == "zeros"
        and isinstance(layer.padding, tuple)  # not padding="same"
    )


def _few_pixels(
    layer: nn.Conv2d | nn.ConvTranspose2d, small: tuple[int, int], large: tuple[int, int]
) -> bool:
    """Whether the (height, width) of the layer's small and large sides take the matrix
    product (an empty or negative size goes to torch, which reports it)."""
    return (
        layer.kernel_size == (3, 3)
        and layer.stride == (2, 2)
        and min(*small, *large) > 0
        and small[0] * small[1] <= FEW_PIXELS
        and large[0] * large[1] <= 4 * FEW_PIXELS
    )


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _like_torch(y: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``y`` in the memory format torch's CPU convolution gives: channels-last when the input
    or the weight is."""
    if _channels_last(x) or _channels_last(weight):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Any, ...]:
    """The tensors as CPU autocast would hand them to a convolution (fp64 and None are left
    alone)."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def _conv_size(layer: nn.Conv2d, x: Tensor) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1


def _unfold(layer: nn.Conv2d, x: Tensor, ho: int, wo: int) -> Tensor:
    """(B, C, H, W) -> rows (B Ho Wo, kh kw C): the input under each kernel position."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (B, H + 2 ph, W + 2 pw, C)
    taps = [
        padded[:, p : p + sh * (ho - 1) + 1 : sh, q : q + sw * (wo - 1) + 1 : sw, :]
        for p in range(kh)
        for q in range(kw)
    ]
    return torch.stack(taps, dim=3).reshape(x.shape[0] * ho * wo, kh * kw * x.shape[1])


class _ConvTransposeSummedBias(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward runs under the forward's autocast
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, geometry: tuple[list[int], ...]
    ) -> Tensor:
        """``geometry``: stride, padding, output padding (groups 1, dilation 1: see _plain)."""
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        stride, padding, output_padding = geometry
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, output_padding = ctx.geometry
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,  # no bias: its gradient is summed below
            stride,
            padding,
            [1, 1],  # dilation
            True,  # transposed
            output_padding,
            1,  # groups
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))  # bf16 is summed in fp32 and rounded once
        return grad_x, grad_w, grad_b, None


def _few_outputs_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], size: tuple[int, int]
) -> Tensor:
    """A stride-1 convolution with few output channels (output ``size``): by
    ``_conv_in_blocks`` where both sizes are even and the CPU has WIDE_VECTORS, else
    ``F.conv2d``."""
    if size[0] % 2 or size[1] % 2 or not WIDE_VECTORS:
        return F.conv2d(x, weight, bias, 1, padding)
    return _conv_in_blocks(x, weight, bias, padding, *size)


def _conv_in_blocks(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], ho: int, wo: int
) -> Tensor:
    """The stride-1 convolution computed for 2x2 output pixels at once: a stride-2 convolution
    with a (k + 1) x (k + 1) kernel and 4 x O output channels (block pixel (r, s) gets the
    kernel shifted by (r, s), zeros elsewhere), then the blocks unfolded. oneDNN pads a
    3-channel output to 16 channels; 12 channels waste far less (measured alone, bf16,
    32 -> 3 channels at 64x64, batch 64: 4.2-4.4 ms against 6.2-6.3)."""
    b, (o, c, kh, kw) = x.shape[0], weight.shape
    blocks = weight.new_zeros(2, 2, o, c, kh + 1, kw + 1)
    for r in range(2):
        for s in range(2):
            blocks[r, s, :, :, r : r + kh, s : s + kw] = weight
    y = F.conv2d(
        x,
        blocks.view(4 * o, c, kh + 1, kw + 1),
        None if bias is None else bias.repeat(4),
        2,
        padding,
    )  # (B, (r, s, o), Ho / 2, Wo / 2)
    # a tensor of its own (not a view: in-place ops on the output work, as on torch's)
    out = torch.empty(
        (b, o, ho, wo), dtype=y.dtype, device=y.device, memory_format=torch.channels_last
    )
    blocks_out = out.permute(0, 2, 3, 1).view(b, ho // 2, 2, wo // 2, 2, o)  # (b, i, r, j, s, o)
    blocks_out.copy_(y.permute(0, 2, 3, 1).view(b, ho // 2, wo // 2, 2, 2, o).transpose(2, 3))
    return out


class _ConvFewOutputsBackward(torch.autograd.Function):
    """A stride-1 convolution with few output channels (``_few_outputs_conv``) whose weight
    gradient (and, with WIDE_VECTORS, input gradient) is a matrix product over the kernel taps
    of the output gradient (its im2col: small, as the output has few channels)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward runs under the forward's autocast
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        padding: list[int],
        size: tuple[int, int],
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _few_outputs_conv(x, weight, bias, padding, size)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        (b, c, h, w), (o, _, kh, kw) = x.shape, weight.shape
        ph, pw = ctx.padding
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and not WIDE_VECTORS:  # torch's input gradient: faster there
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], ctx.padding, [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3))
        if not (ctx.needs_input_grad[1] or (ctx.needs_input_grad[0] and WIDE_VECTORS)):
            return grad_x, grad_w, grad_b, None, None
        # x[i, j] meets grad[i + ph - p, j + pw - q] through tap (p, q): with the gradient
        # padded by k - 1 - padding, that is padded[i + kh - 1 - p, j + kw - 1 - q].
        padded = F.pad(
            grad.permute(1, 0, 2, 3), (kw - 1 - pw, kw - 1 - pw, kh - 1 - ph, kh - 1 - ph)
        )
        taps = [
            padded[:, :, kh - 1 - p : kh - 1 - p + h, kw - 1 - q : kw - 1 - q + w]
            for p in range(kh)
            for q in range(kw)
        ]
        cols = torch.stack(taps).view(kh * kw * o, b * h * w)  # row (p, q, o), column (b, i, j)
        if ctx.needs_input_grad[0] and WIDE_VECTORS:
            taps_w = weight.permute(2, 3, 0, 1).reshape(kh * kw * o, c)
            grad_x = (cols.t() @ taps_w).view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last
        if ctx.needs_input_grad[1]:
            rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view: x is channels-last
            grad_w = (cols @ rows).view(kh, kw, o, c).permute(2, 3, 0, 1).contiguous()
        return grad_x, grad_w, grad_b, None, None


def _few_outputs(layer: nn.Conv2d, x: Tensor, size: tuple[int, int]) -> bool:
    """Whether the layer takes ``_few_outputs_conv`` (and, with a gradient to compute,
    ``_ConvFewOutputsBackward``): a stride-1 convolution with at most ``FEW_CHANNELS``
    outputs, a channels-last input, padding under the kernel size, and a non-empty output
    ``size`` (an empty or negative one goes to torch, which reports it)."""
    return (
        min(size) > 0
        and layer.stride == (1, 1)
        and layer.out_channels <= FEW_CHANNELS
        and _channels_last(x)
        and all(p < k for p, k in zip(layer.padding, layer.kernel_size, strict=True))
    )


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d``; one matrix product when the output has at most ``FEW_PIXELS`` pixels;
    a backward over the output gradient's taps (and 2x2 output blocks with WIDE_VECTORS) when
    it has at most ``FEW_CHANNELS`` channels."""

    def forward(self, x: Tensor) -> Tensor:
        if not _plain(self, x):
            return super().forward(x)
        ho, wo = _conv_size(self, x)
        if _few_pixels(self, (ho, wo), x.shape[2:]):
            return self._matmul(x, ho, wo)
        if _few_outputs(self, x, (ho, wo)):
            x, weight, bias = _autocast_inputs(x, self.weight, self.bias)
            padding = list(self.padding)
            with torch.autocast("cpu", enabled=False):
                if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                    return _ConvFewOutputsBackward.apply(x, weight, bias, padding, (ho, wo))
                return _few_outputs_conv(x, weight, bias, padding, (ho, wo))
        return super().forward(x)

    def _matmul(self, x: Tensor, ho: int, wo: int) -> Tensor:
        """The input under each kernel position (im2col) times the kernel, one product."""
        rows = _unfold(self, x, ho, wo)
        weight = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # (O, kh kw C)
        y = rows @ weight.t() if self.bias is None else torch.addmm(self.bias, rows, weight.t())
        y = y.view(x.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)  # (B, O, Ho, Wo)
        return _like_torch(y, x, self.weight)


class FastConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; one matrix product when the input has at most ``FEW_PIXELS``
    pixels, else torch's convolution with the bias gradient summed apart."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not _plain(self, x):
            return super().forward(x, output_size)
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2,
            list(self.dilation),
        )  # fmt: skip
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        ho = (x.shape[2] - 1) * sh - 2 * ph + kh + output_padding[0]
        wo = (x.shape[3] - 1) * sw - 2 * pw + kw + output_padding[1]
        if _few_pixels(self, x.shape[2:], (ho, wo)):
            return self._matmul(x, ho, wo)
        if self.bias is None:
            return super().forward(x, output_size)
        geometry = (list(self.stride), list(self.padding), list(output_padding))
        x, weight, bias = _autocast_inputs(x, self.weight, self.bias)
        with torch.autocast("cpu", enabled=False):
            return _ConvTransposeSummedBias.apply(x, weight, bias, geometry)

    def _matmul(self, x: Tensor, ho: int, wo: int) -> Tensor:
        """Each input pixel times the kernel, (B H W, C) @ (C, kh kw O), then each tap's
        product added into the output at its offset (col2im) in fp32 (or fp64), the bias too,
        and the sum rounded once to the product's dtype."""
        b, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, kh * kw * self.out_channels)
        cols = (rows @ weight).view(b, h, w, kh, kw, self.out_channels)
        # Output pixel o (padded: o + padding) gets input pixel i through tap p = o + pad - s i.
        size = (max((h - 1) * sh + kh, ho + ph), max((w - 1) * sw + kw, wo + pw))
        acc = cols.new_zeros((b, *size, self.out_channels),
                             dtype=torch.promote_types(cols.dtype, torch.float32))  # fmt: skip
        for p in range(kh):
            for q in range(kw):
                acc[:, p : p + sh * (h - 1) + 1 : sh, q : q + sw * (w - 1) + 1 : sw] += cols[
                    :, :, :, p, q
                ]
        y = acc[:, ph : ph + ho, pw : pw + wo]
        if self.bias is not None:
            y = y + self.bias.to(acc.dtype)
        return _like_torch(y.to(cols.dtype).permute(0, 3, 1, 2), x, self.weight)


def speed_up(model: nn.Module) -> nn.Module:
    """Give each layer of ``model`` that has a faster path here that path, in place; and make
    each LeakyReLU right after a batch norm overwrite the batch norm's output (which that
    norm's backward does not use: autograd checks it), one activation fewer in memory. That
    assumes the norm's output goes only to that LeakyReLU, as in vaelab's conv nets (a norm or
    activation module used in two places, or a hook on the norm, keeps the activation as it
    was)."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = FastConv2d
        elif type(module) is nn.ConvTranspose2d:
            module.__class__ = FastConvTranspose2d
        elif isinstance(module, nn.Sequential):
            for norm, act in zip(module, list(module)[1:], strict=False):
                if (
                    type(norm) is nn.BatchNorm2d
                    and type(act) is nn.LeakyReLU
                    and act.negative_slope >= 0  # torch's in-place backward needs it
                    and uses[id(act)] == uses[id(norm)] == 1  # not shared with other places
                    and not norm._forward_hooks  # nothing else reads the norm's output
                ):
                    act.inplace = True
    return model
