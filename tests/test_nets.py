import pytest
import torch

from vaelab.config import load_config
from vaelab.models import build


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
