import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import ConfigError, load_config, saved_config
from vaelab.models import build
from vaelab.nets import ConvDecoder, ConvEncoder, fast
from vaelab.nets import conv as conv_module
from vaelab.nets.fast import FastConv2d, FastConvTranspose2d, speed_up
from vaelab.speed import fold_batch_norms, for_sampling


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


@pytest.fixture(params=[True, False], ids=["avx512", "avx2"])
def wide(monkeypatch, request):
    """fast.WIDE_VECTORS: each test runs as on a CPU with AVX-512 and as on one with AVX2
    only, whatever this one has."""
    monkeypatch.setattr(fast, "WIDE_VECTORS", request.param)
    return request.param


@pytest.fixture
def paths(monkeypatch, wide):
    """Counts of the fast paths taken: "few pixels" (a matrix product), "summed bias",
    "few outputs" (the backward over the output gradient's taps) and "blocks" (a few-outputs
    convolution computed for 2x2 pixels at once), with and without WIDE_VECTORS."""
    counts = {"few pixels": 0, "summed bias": 0, "few outputs": 0, "blocks": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(fast, "_unfold", counted("few pixels", fast._unfold))
    monkeypatch.setattr(
        FastConvTranspose2d, "_matmul", counted("few pixels", FastConvTranspose2d._matmul)
    )
    summed = fast._ConvTransposeSummedBias
    monkeypatch.setattr(summed, "apply", counted("summed bias", summed.apply))
    few_outputs = fast._ConvFewOutputsBackward
    monkeypatch.setattr(few_outputs, "apply", counted("few outputs", few_outputs.apply))
    monkeypatch.setattr(fast, "_conv_in_blocks", counted("blocks", fast._conv_in_blocks))
    return counts


def _same_results(ref, fast_layer, x, **kwargs):
    """fp64 outputs and every gradient of ``fast_layer`` equal ``ref``'s to 1e-12."""
    ref.zero_grad()
    fast_layer.zero_grad()
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fast = ref(x_ref, **kwargs), fast_layer(x_fast, **kwargs)
    for layout in (torch.contiguous_format, torch.channels_last):  # torch's memory format
        assert y_fast.is_contiguous(memory_format=layout) == y_ref.is_contiguous(
            memory_format=layout
        )
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_fast.backward(grad)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=0, atol=1e-12)
    for name, param in ref.named_parameters():
        grad = fast_layer.get_parameter(name).grad
        torch.testing.assert_close(grad, param.grad, rtol=0, atol=1e-12)


def _fast_copy(layer):
    fast_layer = speed_up(copy.deepcopy(layer))
    assert type(fast_layer) in (FastConv2d, FastConvTranspose2d)
    return fast_layer


# sizes on both sides of FEW_PIXELS: the matrix product, then torch's convolution (with the
# summed bias gradient when there is a bias)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "size, output_padding, bias", [(1, 1, True), (2, 1, True), (2, 0, False), (3, 1, True),
                                   (4, 0, True), (5, 1, False)],
)  # fmt: skip
def test_fast_conv_transpose_matches_torch_in_fp64(
    size, output_padding, bias, channels_last, paths
):
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(
        5, 4, 3, stride=2, padding=1, output_padding=output_padding, bias=bias
    ).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _same_results(ref, _fast_copy(ref), x)
    # output_size picks the output padding, as in torch
    _same_results(ref, _fast_copy(ref), x, output_size=[2 * size, 2 * size])
    few = size * size <= fast.FEW_PIXELS
    assert paths == {
        "few pixels": 2 * few,
        "summed bias": 2 * (bias and not few),
        "few outputs": 0,
        "blocks": 0,
    }


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "size, stride, padding, bias, few",
    [(4, 2, 1, True, True), (3, 2, 1, False, True), (4, 2, 0, True, True),
     (2, 1, 1, True, False), (8, 2, 1, True, False), (6, 1, 1, True, False)],
)  # fmt: skip
def test_fast_conv_matches_torch_in_fp64(size, stride, padding, bias, few, channels_last, paths):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 5, 3, stride=stride, padding=padding, bias=bias).double()
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _same_results(ref, _fast_copy(ref), x)
    assert paths["few pixels"] == few


# odd outputs, one side odd, then even (in 2x2 blocks)
@pytest.mark.parametrize("size", [(9, 7), (8, 7), (8, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "out_channels, kernel, padding, bias",
    [(3, 3, 1, True), (1, 3, 1, False), (4, 3, 0, True), (2, 5, 2, True), (3, (3, 5), (1, 2), True),
     (3, 1, 0, True), (5, 3, 1, True)],
)  # fmt: skip
def test_fast_conv_with_few_outputs_matches_torch_in_fp64(
    out_channels, kernel, padding, bias, channels_last, size, paths, wide
):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, out_channels, kernel, padding=padding, bias=bias).double()
    x = torch.randn(3, 6, *size, dtype=torch.float64)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fast_layer = _fast_copy(ref)
    _same_results(ref, fast_layer, x)
    taken = channels_last and out_channels <= 4  # FEW_CHANNELS: an image's colours
    kh, kw = ref.kernel_size
    even = (
        (size[0] + 2 * ref.padding[0] - kh + 1) % 2
        == 0
        == (size[1] + 2 * ref.padding[1] - kw + 1) % 2
    )
    assert paths["few outputs"] == taken
    assert paths["blocks"] == (taken and even and wide)
    if taken:
        grad_x = x.clone().requires_grad_()
        fast_layer(grad_x).sum().backward()
        assert grad_x.grad.is_contiguous(memory_format=torch.channels_last)  # as torch's
        # an input without a gradient (the data), then no gradient at all
        ref.zero_grad()
        fast_layer.zero_grad()
        ref(x).square().sum().backward()
        fast_layer(x).square().sum().backward()
        torch.testing.assert_close(fast_layer.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        with torch.no_grad():
            y = fast_layer(x)
            torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-12)
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert paths["few outputs"] == 3
        assert paths["blocks"] == 4 * (even and wide)


@pytest.mark.parametrize("size", [7, 8])  # torch's convolution, then the 2x2 blocks
def test_fast_conv_with_few_outputs_allows_what_torchs_layer_allows(size, paths, wide):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(5, 3, 3, padding=1).double().to(memory_format=torch.channels_last)
    x = torch.randn(1, 5, size, size, dtype=torch.float64)  # a batch of one
    x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for layer in (ref, _fast_copy(ref)):
        layer.weight.requires_grad_(False)  # a frozen weight
        xg = x.clone().requires_grad_()
        y = layer(xg)
        y.add_(1)  # an in-place op on the output
        y.square().sum().backward()
        results.append((y, xg.grad, layer.bias.grad))
        assert layer.weight.grad is None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert paths["few outputs"] == 1
    assert paths["blocks"] == (size % 2 == 0 and wide)


def test_few_outputs_backward_keeps_the_forwards_precision(paths):
    """A backward called inside autocast after an fp32 forward stays fp32, as torch's; and a
    layer without bias under bf16 autocast."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 3, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    grads = []
    for layer in (ref, _fast_copy(ref)):
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (y**2).sum().backward()
        grads.append(layer.weight.grad.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    assert paths["few outputs"] == 2


def test_fast_layers_keep_torchs_answers_on_odd_input(paths):
    conv = _fast_copy(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1))
    assert conv(torch.randn(0, 3, 4, 4)).shape == (0, 4, 2, 2)  # an empty batch
    up = torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=3)  # a negative output size
    for layer in (up, _fast_copy(up)):
        with pytest.raises(RuntimeError):  # torch's error, not an empty tensor
            layer(torch.randn(2, 3, 2, 1))
    assert paths["few pixels"] == 0


# the matrix-product path, the summed-bias path; and the few-outputs path (channels-last)
@pytest.mark.parametrize("size", [2, 8])
def test_fast_layers_under_bf16_autocast(size, paths):
    torch.manual_seed(0)
    for ref in (
        torch.nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1),
        torch.nn.Conv2d(8, 6, 3, stride=2, padding=1),
        torch.nn.Conv2d(8, 3, 3, padding=1),
    ):
        fast_layer = _fast_copy(ref)
        x = torch.randn(4, 8, size, size).contiguous(memory_format=torch.channels_last)
        results = []
        for layer in (ref, fast_layer):
            xg = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(xg)
            assert y.dtype == torch.bfloat16
            (y.float() ** 2).sum().backward()
            assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
            results.append((y.float(), xg.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
        # autocast leaves fp64 alone, and so do the fast paths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast_layer.double()(x.double()).dtype == torch.float64
    assert paths["few outputs"] == 2  # in bf16, then in fp64


def test_speed_up_keeps_the_parameters_and_swaps_the_convolutions():
    cfg = load_config(overrides=["model.widths=[4,8]", "model.latent_dim=2"])
    model = build(cfg.model, (1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    speed_up(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    swapped = [type(m) for m in model.modules()]
    assert swapped.count(FastConvTranspose2d) == kinds.count(torch.nn.ConvTranspose2d) == 2
    assert swapped.count(FastConv2d) == kinds.count(torch.nn.Conv2d) == 3
    assert torch.nn.ConvTranspose2d not in swapped and torch.nn.Conv2d not in swapped
    # other LeakyReLUs stay as they were: the MLP net's (no batch norm), a negative slope, one
    # used in two places, one after a norm with a forward hook
    mlp = speed_up(build(load_config(overrides=["model.net=mlp"]).model, (1, 8, 8)))
    assert [m.inplace for m in mlp.modules() if isinstance(m, torch.nn.LeakyReLU)] == [False] * 4
    shared = torch.nn.LeakyReLU(0.2)
    hooked = torch.nn.BatchNorm2d(2)
    hooked.register_forward_hook(lambda *args: None)
    blocks = [
        torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.LeakyReLU(-0.1)),
        torch.nn.Sequential(torch.nn.BatchNorm2d(2), shared, shared),
        torch.nn.Sequential(hooked, torch.nn.LeakyReLU(0.2)),
        torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.LeakyReLU(0.2)),  # this one only
    ]
    speed_up(torch.nn.Sequential(*blocks))
    assert [block[-1].inplace for block in blocks] == [False, False, False, True]
    # each LeakyReLU after a batch norm now overwrites it (4 stages), and trains the same
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.inplace for a in acts)
    plain = build(cfg.model, (1, 8, 8))
    plain.load_state_dict(before)
    assert not any(m.inplace for m in plain.modules() if isinstance(m, torch.nn.LeakyReLU))
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    losses = []
    for m in (model.double(), plain.double()):
        torch.manual_seed(1)
        losses.append(m(x).loss)
        losses[-1].sum().backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)


# -- the decoder's upsampling (model.upsample) ---------------------------------------------------


def _decoder(shape, widths, upsample, latent_dim=3):
    return ConvDecoder(shape, widths, latent_dim, upsample)


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(
    ("shape", "widths"),
    [
        ((1, 28, 28), (4, 8, 8)),  # 28 -> 14 -> 7 -> 4 and back: odd on the way
        ((1, 64, 64), (4, 4, 4)),
        ((1, 32, 32), (4, 8)),
        ((3, 64, 64), (4, 4, 4, 4, 4)),  # down to 2x2
        ((3, 30, 20), (4, 8)),  # not square: 15x10, 8x5
    ],
)
def test_decoders_retrace_the_encoders_sizes(shape, widths, upsample):
    encoder = ConvEncoder(shape, widths, 6)
    decoder = _decoder(shape, widths, upsample)
    x = torch.rand(2, *shape)
    down = [x.shape[2:]]
    h = x
    for stage in encoder.features:
        h = stage(h)
        down.append(h.shape[2:])
    h = decoder.project(torch.randn(2, 3)).view(2, *decoder.start)
    up = [h.shape[2:]]
    for stage in decoder.features:
        h = stage(h)
        up.append(h.shape[2:])
    assert up == down[::-1]
    assert decoder(torch.randn(2, 3)).shape == (2, *shape)
    kinds = {type(m) for m in decoder.modules()}
    if upsample == "resize":
        assert nn.ConvTranspose2d not in kinds and nn.Upsample in kinds
    else:
        assert nn.ConvTranspose2d in kinds and nn.Upsample not in kinds


def test_upsample_is_a_model_key():
    for upsample in ("transpose", "resize"):
        cfg = load_config(overrides=[f"model.upsample={upsample}", "model.widths=[4,8]"])
        kinds = {type(m) for m in build(cfg.model, (1, 8, 8)).decoder.modules()}
        assert (nn.Upsample in kinds) == (upsample == "resize")
        assert (nn.ConvTranspose2d in kinds) == (upsample == "transpose")
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.upsample=bilinear"])
    assert str(err.value) == ("config key 'model.upsample': expected one of 'transpose', 'resize'")
    # the MLP decoder has no upsampling: a value other than the default would be ignored
    with pytest.raises(ConfigError, match=r"^config key 'model.upsample': .*MLP") as err:
        load_config(overrides=["model.net=mlp", "model.upsample=resize"])
    assert "\n" not in str(err.value)
    with saved_config():  # a saved run's config is never refused for it
        assert load_config(overrides=["model.net=mlp", "model.upsample=resize"]).model.net == "mlp"


@pytest.mark.parametrize("size", [(4, 4), (4, 3)])  # to 8x8, and to 7x5 (odd targets)
def test_resize_stage_is_nearest_resize_then_a_convolution(size):
    """The stage against an independent computation: each pixel repeated 2x2 (so output pixel
    i reads source pixel floor(i / 2), the pixel the encoder's stride-2 convolution sampled
    there), cut to the target size, then F.conv2d."""
    torch.manual_seed(0)
    large = (2 * size[0], 2 * size[1] - 1)
    stage = conv_module._up_block("resize", 5, 6, size, large).double().eval()
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[
        ..., : large[0], : large[1]
    ]
    torch.testing.assert_close(
        F.interpolate(x, size=large, mode="nearest"), repeated, rtol=0, atol=0
    )
    conv = stage[1]
    expected = F.conv2d(repeated, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(stage[1](stage[0](x)), expected, rtol=0, atol=1e-12)


def test_only_the_transposed_stage_builds_in_a_checkerboard():
    """A constant input (what a decoder sees where its features are flat): the resize stage's
    output is constant away from the border, the transposed stage's takes one value per 2x2
    phase (even pixels get one kernel tap per axis, odd ones two: Odena et al. 2016)."""
    torch.manual_seed(0)
    x = torch.ones(1, 4, 6, 6, dtype=torch.float64)
    for upsample in ("transpose", "resize"):
        stage = conv_module._up_block(upsample, 4, 3, (6, 6), (12, 12)).double()
        conv = stage[1] if upsample == "resize" else stage[0]
        y = stage[: len(stage) - 2](x) if upsample == "resize" else conv(x)  # before the norm
        inner = y[..., 2:-2, 2:-2]  # (1, 3, 8, 8), starting at an even pixel
        phases = inner.unfold(2, 2, 2).unfold(3, 2, 2)  # (1, 3, 4, 4, 2, 2): (.., phase r, s)
        assert (phases - phases[:, :, :1, :1]).abs().max() < 1e-12  # constant in each phase
        # each phase against phase (0, 0), per channel: (3, 2, 2)
        between = (phases - phases[..., :1, :1]).abs().amax(dim=(0, 2, 3))
        if upsample == "resize":
            assert between.max() < 1e-12  # one value everywhere
        else:
            assert (between.flatten(1)[:, 1:] > 1e-3).all()  # the other 3 phases differ


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_folded_batch_norms_give_the_same_decoder(upsample):
    torch.manual_seed(0)
    decoder = _decoder((1, 28, 28), (4, 8, 8), upsample).double()
    with torch.no_grad():  # running statistics and affine parameters away from 0 and 1
        for _ in range(3):
            decoder(torch.randn(16, 3, dtype=torch.float64))
        for m in decoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    decoder.eval()
    folded = fold_batch_norms(copy.deepcopy(decoder))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    z = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(z), decoder(z), rtol=0, atol=1e-10)
    # for_sampling folds too, and keeps channels-last
    fast_copy = for_sampling(decoder, channels_last=True)
    torch.testing.assert_close(fast_copy(z), decoder(z), rtol=0, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_layers_train_the_resize_decoder_the_same(channels_last, paths):
    """speed_up on a resize model: the same loss and gradients (fp64). Its stride-1
    convolutions with at most FEW_CHANNELS outputs take the few-outputs path when
    channels-last, the others torch's."""
    cfg = load_config(
        overrides=["model.widths=[4,8]", "model.latent_dim=2", "model.upsample=resize"]
    )
    torch.manual_seed(0)
    plain = build(cfg.model, (1, 8, 8)).double()
    model = speed_up(copy.deepcopy(plain))
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    if channels_last:
        plain, model = (m.to(memory_format=torch.channels_last) for m in (plain, model))
        x = x.contiguous(memory_format=torch.channels_last)
    losses = []
    for m in (model, plain):
        torch.manual_seed(1)
        losses.append(m(x).loss)
        losses[-1].sum().backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12, msg=name)
    # 8 -> 4 channels at 4x4 and the 1-channel output layer (the 8 -> 8 stage has 8 outputs)
    assert paths["few outputs"] == 2 * channels_last
