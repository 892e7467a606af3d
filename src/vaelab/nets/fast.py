"""Faster CPU computations of layers the conv networks use: the same parameters and the same
results up to rounding, so checkpoints and ``state_dict`` keys do not change.

``speed_up(model)`` swaps the class of each layer that has a faster path here for a subclass
that only overrides ``forward`` (as ``SyncBatchNorm.convert_sync_batchnorm`` swaps batch norms).
A swapped layer takes its parent's ``forward`` for input the fast path does not cover (a CUDA
tensor). The trainer applies it when ``train.fast_layers`` is on.

- ``SummedBiasConvTranspose2d``: on CPUs, torch's ``convolution_backward`` computes a transposed
  convolution's bias gradient (the sum of the output gradient over batch and pixels) about ten
  times slower than a plain sum: 21 ms of the 31 ms backward of the CelebA-64 decoder's last
  32 -> 32 channel layer at batch 64 in bf16, measured on 2 cores. Here the backward asks
  ``convolution_backward`` for the input and weight gradients only and sums the bias gradient
  itself, accumulating in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx


class _ConvTransposeSummedBias(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, geometry: tuple[list[int], ...]
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        stride, padding, output_padding, dilation, groups = geometry
        return nn.functional.conv_transpose2d(
            x, weight, bias, stride, padding, output_padding, groups[0], dilation
        )

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, output_padding, dilation, groups = ctx.geometry
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,  # no bias: its gradient is summed below
            stride,
            padding,
            dilation,
            True,  # transposed
            output_padding,
            groups[0],
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_b = None
        if ctx.needs_input_grad[2]:
            accumulate = torch.promote_types(grad.dtype, torch.float32)
            grad_b = grad.sum(dim=(0, 2, 3), dtype=accumulate).to(grad.dtype)
        return grad_x, grad_w, grad_b, None


class SummedBiasConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose bias gradient is a plain sum (see the module's docstring)."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if x.device.type != "cpu" or self.bias is None or x.dim() != 4:
            return super().forward(x, output_size)
        output_padding = self._output_padding(
            x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), 2,
            list(self.dilation),
        )  # fmt: skip
        geometry = (
            list(self.stride),
            list(self.padding),
            list(output_padding),
            list(self.dilation),
            [self.groups],
        )
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # autocast casts a convolution's inputs
            dtype = torch.get_autocast_dtype("cpu")
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _ConvTransposeSummedBias.apply(x, weight, bias, geometry)


def speed_up(model: nn.Module) -> nn.Module:
    """Give each layer of ``model`` that has a faster path here that path, in place."""
    for module in model.modules():
        if type(module) is nn.ConvTranspose2d and module.padding_mode == "zeros":
            module.__class__ = SummedBiasConvTranspose2d
    return model
