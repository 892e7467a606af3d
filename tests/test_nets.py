import copy

import pytest
import torch

from vaelab.config import load_config
from vaelab.models import build
from vaelab.nets.fast import SummedBiasConvTranspose2d, speed_up


@pytest.mark.parametrize(
    ("shape", "widths"),
    [
        ((1, 28, 28), "[32,64]"),
        ((1, 28, 28), "[8,16,32]"),  # 28 -> 14 -> 7 -> 4 and back
        ((3, 32, 32), "[8,16,32]"),
        ((3, 64, 64), "[8,8,8,8,8]"),
        ((3, 128, 128), "[4,4,4,4,4]"),
        ((3, 30, 20), "[4,8]"),  # not square, not a power of two
    ],
)
@pytest.mark.parametrize("net", ["conv", "mlp"])
def test_vae_nets_round_trip_any_shape(shape, widths, net):
    if net == "mlp":
        widths = "[16]"
    cfg = load_config(
        overrides=[f"model.net={net}", f"model.widths={widths}", "model.latent_dim=3"]
    )
    model = build(cfg.model, shape)
    x = torch.rand(2, *shape)
    q = model.encode(x)
    assert q.mu.shape == (2, 3)
    out = model.decode(q.mode())
    assert out.shape == (2, *shape)
    assert out.min() >= 0 and out.max() <= 1  # the decoder's mean lies in the data's range


def test_conv_widths_change_the_network():
    small = build(load_config(overrides=["model.widths=[4]"]).model, (1, 28, 28))
    big = build(load_config(overrides=["model.widths=[16,32]"]).model, (1, 28, 28))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) > count(small)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size, output_padding", [(3, 1), (4, 0), (5, 1)])
def test_summed_bias_conv_transpose_matches_torch_in_fp64(size, output_padding, channels_last):
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=output_padding)
    fast = copy.deepcopy(ref)
    speed_up(fast)
    assert type(fast) is SummedBiasConvTranspose2d
    ref, fast = ref.double(), fast.double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fast = ref(x_ref), fast(x_fast)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fast.backward(grad)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
    # output_size picks the output padding, as in torch
    other = fast(x, output_size=[2 * size, 2 * size])
    torch.testing.assert_close(other, ref(x, output_size=[2 * size, 2 * size]))


def test_summed_bias_conv_transpose_under_bf16_autocast():
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
    fast = speed_up(copy.deepcopy(ref))
    x = torch.randn(4, 8, 5, 5)
    grads = []
    for layer in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        (y.float() ** 2).sum().backward()
        grads.append(layer.bias.grad)
        assert layer.bias.grad.dtype == torch.float32  # the master weights' dtype
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-2)


def test_speed_up_keeps_the_parameters_and_swaps_only_transposed_convolutions():
    cfg = load_config(overrides=["model.widths=[4,8]", "model.latent_dim=2"])
    model = build(cfg.model, (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    speed_up(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    swapped = [type(m) for m in model.modules()]
    assert swapped.count(SummedBiasConvTranspose2d) == kinds.count(torch.nn.ConvTranspose2d) == 2
    assert torch.nn.ConvTranspose2d not in swapped
    assert swapped.count(torch.nn.Conv2d) == kinds.count(torch.nn.Conv2d)
