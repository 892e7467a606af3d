"""vaelab: train, evaluate and compare variational autoencoders on images.

>>> import vaelab
>>> cfg = vaelab.load_config(overrides=["model.name=vae", "train.epochs=3"])
>>> run = vaelab.train(cfg, "runs/vae")            # doctest: +SKIP
>>> model = vaelab.load(run)                       # doctest: +SKIP
>>> images = model.sample(64)                      # (64, 1, 28, 28) in [0, 1]
"""

from vaelab import models  # noqa: F401  (registers the model variants)
from vaelab.checkpoint import load
from vaelab.config import ConfigError, RunConfig, load_config
from vaelab.trainer import resume, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "load", "load_config", "resume", "train"]
