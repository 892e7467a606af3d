"""Encoder and decoder architectures, built from the image shape (C, H, W).

An encoder maps images (B, C, H, W) to features (B, out_dim); a decoder maps latents (B, d) to
per-pixel logits (B, C, H, W). No losses and no sampling live here: the model decides what the
numbers mean (mean and log-variance, Bernoulli logits, a Gaussian mean through a sigmoid).

Each architecture is an encoder/decoder pair registered under a name, the value of
``model.net``: the built-in ``conv`` and ``mlp`` here, and your own with ``register``
(docs/extending.md, "Your own networks").
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vaelab.config import NET_UPSAMPLES, ModelConfig
from vaelab.nets.conv import ConvDecoder, ConvEncoder
from vaelab.nets.mlp import MLPDecoder, MLPEncoder

Shape = tuple[int, int, int]
BUILT_IN = frozenset({"conv", "mlp"})  # registered below; a run of any other net records its file


@dataclass(frozen=True)
class Net:
    """An encoder/decoder pair, as registered: ``encoder(shape, widths, out_dim)`` and
    ``decoder(shape, widths, latent_dim)`` (plus ``upsample`` where the decoder takes
    model.upsample), each returning an nn.Module; ``file`` and ``sha256``: the Python file that
    registered it and its digest (None for a net registered without a file), which a run
    records."""

    encoder: Callable[..., nn.Module]
    decoder: Callable[..., nn.Module]
    upsample: bool = False
    file: Path | None = None
    sha256: str | None = None


NETS: dict[str, Net] = {}


def register(
    name: str,
    *,
    encoder: Callable[..., nn.Module],
    decoder: Callable[..., nn.Module],
    upsample: bool = False,
) -> None:
    """Make an encoder/decoder pair buildable as ``model.net=<name>``.

    ``encoder(shape, widths, out_dim)`` maps images (B, C, H, W) to (B, out_dim);
    ``decoder(shape, widths, latent_dim)`` maps latents (B, latent_dim) to logits (B, C, H, W);
    ``shape`` is (C, H, W) and ``widths`` is model.widths, for the pair to read as it likes.
    Usually both are nn.Module classes. With ``upsample=True`` the decoder also takes
    model.upsample ("transpose" or "resize") as a fourth argument; otherwise the config refuses
    that key for this net. The file that calls ``register`` is the plugin a run of this net
    records (``vaelab train --plugin FILE``). Registering a name again with another pair is a
    ValueError; importing the same file again is not.
    """
    if not (isinstance(name, str) and name.strip()):
        raise TypeError(f"register({name!r}): expected the net's name, a non-empty string")
    for role, builder in (("encoder", encoder), ("decoder", decoder)):
        if not callable(builder):
            raise TypeError(f"register('{name}'): {role} must be callable, got {builder!r}")
    frame = inspect.currentframe()
    caller = frame.f_back.f_globals.get("__file__") if frame and frame.f_back else None
    file = Path(caller).resolve() if caller and name not in BUILT_IN else None
    net = Net(encoder, decoder, upsample, file, file_digest(file))
    known = NETS.get(name)
    if known is not None and _identity(known) != _identity(net):
        first = f"first from {known.file}" if known.file else "first from code outside a file"
        raise ValueError(
            f"net '{name}' is registered twice ({'built in' if name in BUILT_IN else first})"
        )
    NETS[name] = net
    NET_UPSAMPLES[name] = upsample


def _identity(net: Net) -> tuple[object, ...]:
    """What makes two registrations the same pair: where each builder is defined (a file
    imported again defines new objects of the same names)."""
    return (_origin(net.encoder), _origin(net.decoder), net.upsample)


def _origin(obj: object) -> tuple[str, str]:
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    where = str(Path(file).resolve()) if file else str(getattr(obj, "__module__", ""))
    return where, getattr(obj, "__qualname__", repr(obj))


def file_digest(file: Path | None) -> str | None:
    """The sha256 of a plugin's file, as a run records it (``vaelab.nets.register`` and
    ``vaelab.models.register``); None without a file or when it cannot be read."""
    if file is None or not file.is_file():
        return None
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError:
        return None


def plugin_record(net: str) -> dict[str, str] | None:
    """What a run of ``model.net=<net>`` records about the plugin that registered the net
    (``{"net", "file", "sha256"}``, the file by name only: runs move between machines); None
    for a built-in net."""
    if net in BUILT_IN or net not in NETS:
        return None
    entry = NETS[net]
    record = {"net": net, "file": entry.file.name if entry.file else ""}
    return {**record, "sha256": entry.sha256} if entry.sha256 else record


def build_encoder(cfg: ModelConfig, shape: Shape, out_dim: int) -> nn.Module:
    return NETS[cfg.net].encoder(shape, cfg.widths, out_dim)


def build_decoder(cfg: ModelConfig, shape: Shape) -> nn.Module:
    net = NETS[cfg.net]
    if net.upsample:
        return net.decoder(shape, cfg.widths, cfg.latent_dim, cfg.upsample)
    return net.decoder(shape, cfg.widths, cfg.latent_dim)


register("conv", encoder=ConvEncoder, decoder=ConvDecoder, upsample=True)
register("mlp", encoder=MLPEncoder, decoder=MLPDecoder)

__all__ = [
    "BUILT_IN",
    "NETS",
    "ConvDecoder",
    "ConvEncoder",
    "MLPDecoder",
    "MLPEncoder",
    "Net",
    "build_decoder",
    "build_encoder",
    "file_digest",
    "plugin_record",
    "register",
]
