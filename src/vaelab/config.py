"""Configuration: one frozen dataclass per room, composed into a RunConfig.

A config comes from defaults, then a YAML file, then dotted ``key=value`` overrides
(``model.beta=4 train.epochs=3``). Every key and every value is checked against the dataclass
fields, so a typo is a one-line error naming the key, never a silently ignored setting.

Model variants add their own fields by subclassing ``ModelConfig`` and registering the subclass
under the model's name (see ``vaelab.models``); ``model.name`` picks which class the ``model``
section is checked against.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.resources
import math
import re
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value that is not what vaelab expects (message names the key)."""


@dataclass(frozen=True)
class DataConfig:
    # a registered data source: mnist5k | celeba | folder | idx | fashion_mnist | shapes
    # (docs/data.md)
    name: str = "mnist5k"
    # the source's folder (celeba, folder, idx), or for mnist5k another CSV file (784 pixel
    # columns 0-255, then the label)
    root: str = ""
    size: int = 0  # output height = width; 0: the source's own (28 for digits, 64 for folders)
    # centre crop before resizing; 0: the source's (148 for celeba, else the centre square of
    # the short side)
    crop: int = 0
    channels: int = 0  # 1 (grey) or 3 (RGB); 0: the source's own (3 for image folders)
    val_fraction: float = 0.1  # share held out for validation where a source has no split
    seed: int = 0  # seeds the train/val split, independent of the training seed
    flip: bool = False  # random horizontal flips of training batches (for faces)
    binarize: bool = False  # pixels >= 1/2 become 1, the rest 0 (for model.likelihood=bernoulli)
    cache_dir: str = ""  # preprocessing cache; "": $VAELAB_CACHE or ~/.cache/vaelab
    workers: int = 0  # processes decoding images while preparing; 0: all cores
    subset: int = 0  # for generated data (shapes): a seeded subset of this many images; 0: all

    def __post_init__(self) -> None:
        check_types(self, "data")
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", "a number in (0, 1)")
        require(self.size >= 0, "data.size", "an integer >= 0 (0: the source's own)")
        require(self.crop >= 0, "data.crop", "an integer >= 0 (0: the source's own)")
        require(self.channels in (0, 1, 3), "data.channels", "0, 1 or 3")
        require(self.workers >= 0, "data.workers", "an integer >= 0 (0: all cores)")
        require(self.subset >= 0, "data.subset", "an integer >= 0 (0: all)")


@dataclass(frozen=True)
class ModelConfig:
    """Fields every model has. Variants subclass this to add their own."""

    name: str = "vae"  # the model variant: a registered name (below)
    # conv (stride-2 3x3 stages) | mlp | a net of your own (vaelab.nets.register; on the command
    # line its file comes with --plugin FILE.py)
    net: str = "conv"
    widths: tuple[int, ...] = (32, 64)  # conv: channels per stride-2 stage; mlp: hidden sizes
    # conv decoder's upsampling: transpose (3x3 stride-2 transposed convolutions) | resize
    # (nearest-neighbour resize, then a 3x3 convolution: no checkerboard artifacts, Odena et al.
    # 2016). A run saved before this key existed loads as transpose, whatever the default
    upsample: str = "transpose"
    latent_dim: int = 16  # d, the size of z
    # gaussian (fixed variance) | bernoulli (for binary pixels: data.binarize=true)
    likelihood: str = "gaussian"
    # Decoder variance for the Gaussian likelihood. 1/2 makes -log p(x|z) the plain sum of
    # squared errors plus a constant, as in the derivation (docs/science.md). Refused with
    # likelihood=bernoulli and by sigma_vae, which sets it from the data.
    sigma2: float = 0.5
    mc_samples: int = 1  # m: samples of z per image in the objective (K for iwae)
    # nats per latent dimension (Kingma et al. 2016); 0: off. Refused by models without a
    # separate KL term (decoder_only, iwae, beta_vae_capacity)
    free_bits: float = 0.0

    def __post_init__(self) -> None:
        check_types(self, "model")
        if self.net not in NET_UPSAMPLES:
            raise ConfigError(
                f"config key 'model.net': unknown net '{self.net}' (known: "
                f"{', '.join(sorted(NET_UPSAMPLES))}); a net of your own needs its file: "
                "--plugin FILE.py (in Python: import it first)"
            )
        require(
            self.upsample in ("transpose", "resize"),
            "model.upsample",
            "one of 'transpose', 'resize'",
        )
        require(
            self.likelihood in ("gaussian", "bernoulli"),
            "model.likelihood",
            "one of 'gaussian', 'bernoulli'",
        )
        require(
            len(self.widths) >= 1 and all(w >= 1 for w in self.widths),
            "model.widths",
            "a non-empty list of positive integers",
        )
        require(self.latent_dim >= 1, "model.latent_dim", "an integer >= 1")
        require(0 < self.sigma2 < math.inf, "model.sigma2", "a finite number > 0")
        require(self.mc_samples >= 1, "model.mc_samples", "an integer >= 1")
        require(0 <= self.free_bits < math.inf, "model.free_bits", "a finite number >= 0")
        if self.likelihood == "bernoulli":
            unused(self, "sigma2", "a Bernoulli decoder has no variance")
        if not NET_UPSAMPLES[self.net]:
            unused(
                self,
                "upsample",
                "an MLP decoder does not upsample"
                if self.net == "mlp"
                else f"the decoder of net '{self.net}' does not take it",
            )

    def default(self, key: str) -> Any:
        """The default of field ``key`` in this model's config class."""
        return type(self).__dataclass_fields__[key].default


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 128  # global under torchrun; the last partial batch of an epoch is dropped
    lr: float = 1e-3  # Adam's learning rate
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 over train.epochs)
    kl_warmup_steps: int = 0  # the KL weight rises linearly from 0 over this many steps
    seed: int = 0  # seeds initialisation, shuffling and the model's noise
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # fp32 | bf16 | fp16 (autocast for the networks; losses stay fp32) | fp64 (numerical checks)
    # | auto (bf16 where the device computes it natively, else fp32; config.yaml records which)
    precision: str = "fp32"
    # run an explicit bf16/fp16 on a CPU that emulates it (10x or more slower than fp32) anyway
    allow_emulated: bool = False
    channels_last: bool = True  # NHWC memory format for conv networks (faster on CPUs)
    compile: bool = False  # torch.compile the model (falls back to eager, with a message)
    fused_adam: bool = True  # Adam's fused kernel (false: torch's default implementation)
    log_every: int = 50  # read the loss (NaN check, progress bar) every this many steps
    # CPU: the process keeps freed memory for reuse (glibc) instead of returning each large
    # tensor's pages to the OS and faulting them in again on the next allocation
    cpu_memory_cache: bool = True
    fast_layers: bool = True  # CPU: layers with a faster path in vaelab.nets.fast take it
    progress: bool = True  # a tqdm bar per epoch
    tensorboard: bool = False  # also log scalars and images to RUN/tensorboard (optional extra)

    def __post_init__(self) -> None:
        check_types(self, "train")
        require(self.epochs >= 1, "train.epochs", "an integer >= 1")
        require(self.batch_size >= 1, "train.batch_size", "an integer >= 1")
        require(0 < self.lr < math.inf, "train.lr", "a finite number > 0")
        require(
            self.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "constant or cosine"
        )
        require(self.device in ("cpu", "cuda", "auto"), "train.device", "cpu, cuda or auto")
        require(
            self.precision in ("fp32", "bf16", "fp16", "fp64", "auto"),
            "train.precision",
            "fp32, bf16, fp16, fp64 or auto",
        )
        require(self.log_every >= 1, "train.log_every", "an integer >= 1")
        require(self.threads >= 0, "train.threads", "an integer >= 0")
        require(self.kl_warmup_steps >= 0, "train.kl_warmup_steps", "an integer >= 0")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# Filled by vaelab.models as each variant registers itself: model name -> its config class.
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {}
# Filled by vaelab.nets as each encoder/decoder pair registers: net name -> whether its decoder
# takes model.upsample.
NET_UPSAMPLES: dict[str, bool] = {}

_SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig}


def require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': expected {expected}")


# True while a run's saved config is rebuilt: a run trained before a setting was refused keeps
# loading, evaluating and resuming as it was trained.
_SAVED = contextvars.ContextVar("vaelab_saved_config", default=False)

# Model keys added after runs were first saved -> the value every run saved without the key was
# trained with. A saved config that lacks such a key gets this value, not the key's default, so
# the run rebuilds the network it trained even after the default changes.
SAVED_WITHOUT: dict[str, Any] = {"upsample": "transpose"}  # the only decoder before the key


@contextlib.contextmanager
def saved_config() -> typing.Iterator[None]:
    """Rebuild configs a run saved: settings its model ignores are not refused (``unused``),
    and model keys the run's files predate take the value they had then (``SAVED_WITHOUT``)."""
    token = _SAVED.set(True)
    try:
        yield
    finally:
        _SAVED.reset(token)


def unused(cfg: ModelConfig, key: str, why: str) -> None:
    """Refuse a model key that ``cfg``'s model would ignore. A value equal to the key's default
    counts as unset (a config cannot tell "left alone" from "set to the default"). Not inside
    ``saved_config()``: a saved run loads as it was trained."""
    value, default = getattr(cfg, key), cfg.default(key)
    if value != default and not _SAVED.get():
        raise ConfigError(
            f"config key 'model.{key}': model '{cfg.name}' does not use it ({why}); expected "
            f"it unset (default {_show(default)}), got {_show(value)}"
        )


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def to_dict(obj: Any) -> Any:
    """A plain dict/list form of a config (tuples become lists), for YAML and JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _from_text(key: str, text: str, tp: Any) -> Any:
    """A command-line value (always text) in the field's type. Text fields take the text as it
    is, so data.root=0123 stays '0123' (YAML would read it as the octal number 83)."""
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {text!r}")
    if typing.get_origin(tp) is tuple:
        items = [t.strip() for t in text.strip().strip("[]()").split(",") if t.strip()]
        return tuple(_from_text(key, t, typing.get_args(tp)[0]) for t in items)
    if tp is str:
        return text
    if tp is bool:
        if text.strip().lower() in TRUE + FALSE:
            return text.strip().lower() in TRUE
        raise bad
    try:
        return tp(text.strip())  # int or float
    except ValueError:
        raise bad from None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check a value read from YAML against the field's type ``tp``; return it in that type."""
    bad = ConfigError(
        f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if typing.get_origin(tp) is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(key, v, typing.get_args(tp)[0]) for v in items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is str and isinstance(value, int | float | bool):
        # YAML reads 0123 as the octal number 83, and no as false
        raise ConfigError(f"{bad}; text that looks like a number or a yes/no goes in quotes")
    raise bad


def check_types(obj: Any, section: str) -> None:
    """Type-check a config dataclass's fields (also when built directly in Python); ints given
    for float fields become floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])
        object.__setattr__(obj, f.name, value)


def _build_section(section: str, cls: type, values: dict[str, Any], whose: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key '{section}.{key}' ({whose or section} has: {', '.join(names)})"
            )
        if isinstance(value, Override):
            kwargs[key] = _from_text(f"{section}.{key}", value.text, hints[key])
        else:
            kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


@dataclass(frozen=True)
class Override:
    """A value from the command line: text, converted by the type of the field it sets."""

    text: str


def _set_dotted(tree: dict[str, Any], dotted: str, value: Override) -> None:
    section, _, key = dotted.partition(".")
    if not key or "." in key:
        raise ConfigError(f"config override '{dotted}': expected section.key, e.g. model.beta=4")
    if section not in ("data", "model", "train"):
        raise ConfigError(
            f"unknown config section '{section}' in '{dotted}' (known: data, model, train)"
        )
    tree[section] = {**tree.get(section, {}), key: value}


def parse_override(text: str) -> tuple[str, Override]:
    """``'model.beta=4'`` -> ``('model.beta', Override('4'))``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"config override '{text}': expected key=value, e.g. train.epochs=3")
    return key.strip(), Override(raw)


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Build and check a RunConfig from a nested dict (as read from YAML)."""
    if not isinstance(tree, dict):
        raise ConfigError("config: expected a mapping with sections data, model, train")
    for section, values in list(tree.items()):
        if section not in ("data", "model", "train"):
            raise ConfigError(f"unknown config section '{section}' (known: data, model, train)")
        if values is None:  # a section whose keys are all commented out
            tree[section] = {}
        elif not isinstance(values, dict):
            raise ConfigError(f"config section '{section}': expected a mapping of key: value")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _build_section(name, cls, tree.get(name, {}))
    model_values = dict(tree.get("model", {}))
    name = model_values.get("name", ModelConfig.name)
    model_name = name.text if isinstance(name, Override) else _coerce("model.name", name, str)
    if model_name not in MODEL_CONFIGS:
        known = ", ".join(sorted(MODEL_CONFIGS)) or "none registered (import vaelab)"
        raise ConfigError(f"config key 'model.name': unknown model '{model_name}' (known: {known})")
    model_values["name"] = model_name
    if _SAVED.get():
        for key, value in SAVED_WITHOUT.items():
            model_values.setdefault(key, value)
    sections["model"] = _build_section(
        "model", MODEL_CONFIGS[model_name], model_values, whose=f"model '{model_name}'"
    )
    return RunConfig(**sections)


# -- reading YAML ------------------------------------------------------------------------------
# YAML 1.1 (PyYAML's resolver) reads 1e-3 as text, since its floats need a dot; the command line
# and YAML 1.2 read it as a number. Floats here: YAML 1.1's forms, plus an exponent without a dot
# or without a sign (1e-3, 1E5), and a leading dot with a sign (-.5).
_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (``1e-3`` is a number), and duplicate keys
    refused (naming the key and both lines) instead of the last one silently winning."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_duplicates(node, "")
        return super().construct_document(node)


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _check_duplicates(node: yaml.Node, where: str, seen_nodes: set[int] | None = None) -> None:
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                dotted = f"{where}.{key.value}" if where else str(key.value)
                line = key.start_mark.line + 1
                if (key.tag, key.value) in lines:
                    raise ConfigError(
                        f"duplicate key '{dotted}' on lines {lines[key.tag, key.value]} and "
                        f"{line}: expected each key once"
                    )
                lines[key.tag, key.value] = line
                _check_duplicates(value, dotted, seen_nodes)
            else:
                _check_duplicates(value, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicates(item, where, seen_nodes)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    if isinstance(err, yaml.MarkedYAMLError):
        what = " ".join(p for p in (err.context, err.problem) if p) or "not valid YAML"
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return f"{where}not valid YAML ({what})"
    return "not valid YAML (" + " ".join(str(err).split()) + ")"


def read_yaml(path: Path | Traversable) -> Any:
    """The YAML document in the file ``path``, read with ``ConfigLoader``; a ConfigError naming
    the file for a file that is missing, a folder, unreadable, not UTF-8 text or not YAML."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder: expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file '{path}': not UTF-8 text (byte {err.object[err.start]:#04x} at "
            f"position {err.start}): expected a YAML file"
        ) from None
    except OSError as err:
        raise ConfigError(f"config file '{path}': cannot read it ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds plain data only
    except ConfigError as err:
        raise ConfigError(f"config file '{path}': {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}': nested too deeply") from None


# -- the shipped configs -----------------------------------------------------------------------
# The example configs live in the package (vaelab/configs/NAME.yaml), so a plain `pip install`
# has them: `vaelab train celeba_vae ...` works outside a checkout.
SHIPPED_PACKAGE = "vaelab.configs"


def shipped_configs() -> dict[str, Traversable]:
    """The configs shipped with vaelab: name (the file's stem) -> its file, sorted by name."""
    files = importlib.resources.files(SHIPPED_PACKAGE).iterdir()
    found = {f.name.removesuffix(".yaml"): f for f in files if f.name.endswith(".yaml")}
    return dict(sorted(found.items()))


def shipped_description(name: str) -> str:
    """A shipped config's one-line description: the first comment line of its file."""
    for line in shipped_configs()[name].read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _bare_name(text: str) -> bool:
    return not any(sep in text for sep in ("/", "\\")) and not text.endswith((".yaml", ".yml"))


def is_shipped(path: str | Path) -> bool:
    """Whether the config argument ``path`` selects a shipped config: a shipped name that is not
    an existing file or folder (a file of that name wins)."""
    text = str(path)
    return _bare_name(text) and text in shipped_configs() and not Path(path).exists()


def resolve_config(path: str | Path) -> Path | Traversable:
    """The file a config argument names. An existing file (or folder, refused when read) wins;
    otherwise a bare name (no '/', no '.yaml') is a shipped config, and an unknown name is a
    ConfigError listing the shipped names. Anything else stays a path (read_yaml says it is
    missing)."""
    if Path(path).exists():
        return Path(path)
    text, shipped = str(path), shipped_configs()
    if _bare_name(text):
        if text in shipped:
            return shipped[text]
        raise ConfigError(
            f"config '{text}': no such file, and not the name of a shipped config "
            f"(shipped: {', '.join(shipped)}; `vaelab config --list` describes them)"
        )
    stem = Path(text).name.removesuffix(".yaml").removesuffix(".yml")
    if stem in shipped:  # an old `configs/NAME.yaml` path from a checkout
        raise ConfigError(
            f"config file '{text}' not found (the example configs ship with vaelab: for that "
            f"one, give its name, {stem})"
        )
    return Path(path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides.

    ``path`` may also name a shipped config (``"celeba_vae"``, see ``shipped_configs``); an
    existing file of that name wins.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}': expected a mapping of sections")
        tree = dict(loaded or {})
        for section, values in tree.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"config file '{path}': section '{section}' is not a mapping")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)


class ConfigDumper(yaml.SafeDumper):
    """Writes text that ConfigLoader reads back as text: '1e5' is quoted, as YAML 1.2 would
    read it as a number."""


ConfigDumper.yaml_implicit_resolvers = ConfigLoader.yaml_implicit_resolvers


def dump_yaml(cfg: RunConfig, comments: dict[str, str] | None = None) -> str:
    """The config as YAML; ``comments``: a line-end comment for some keys ("train.precision")."""
    text = yaml.dump(cfg.to_dict(), Dumper=ConfigDumper, sort_keys=False)
    if not comments:
        return text
    lines, section = text.splitlines(), ""
    for i, line in enumerate(lines):
        key = line.strip().partition(":")[0]
        if not line.startswith(" "):
            section = key
        elif f"{section}.{key}" in comments:
            lines[i] += f"  # {comments[f'{section}.{key}']}"
    return "\n".join(lines) + "\n"
