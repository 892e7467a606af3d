"""The configuration reference, docs/config.md, generated from the config dataclasses.

    python -m vaelab.reference --write docs/config.md    # rewrite the page
    python -m vaelab.reference                           # print it

Every key comes from a dataclass field: ``DataConfig``, ``ModelConfig``, ``TrainConfig`` in
vaelab.config, and each registered model variant's config class. A field's description is its
source comment: the comment lines right above the field and/or the comment at the end of its
line. So adding a field with a comment documents it; tests/test_reference.py fails until the
page is rewritten.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

from vaelab.config import MODEL_CONFIGS, DataConfig, ModelConfig, TrainConfig

COMMAND = "python -m vaelab.reference --write docs/config.md"

HEADER = f"""\
# Configuration reference

<!-- Generated from the config dataclasses by
     {COMMAND}
     Edit the comments beside the fields (src/vaelab/config.py, src/vaelab/models/*.py) and the
     prose in src/vaelab/reference.py, not this page. -->

A config has three sections, `data`, `model` and `train`. It starts from the defaults below,
then a YAML file (yours, or a shipped one by name: `vaelab config --list` names them and
`vaelab config NAME` prints one to copy), then dotted `key=value` overrides on the command line
(`model.beta=4 train.epochs=3`) or in `vaelab.load_config(path, overrides)`. `vaelab config
[CONFIG] [key=value ...]` prints the resolved values.

Each override is read in its key's type: text stays text (`data.root=0123` is the folder
`0123`), lists are `model.widths=[32,64,128]` or `model.widths=32,64,128`, booleans
`true`/`false`. YAML numbers are read as YAML 1.2 does (`lr: 1e-3` is a number). An unknown
key, a wrong type or a bad value (a negative or infinite learning rate, a cuda device where
there is none, a data root that does not exist, a key set twice in a YAML file, a setting the
chosen model would ignore) stops before anything is written, with one line naming the key.

`model.name` picks the model, and with it the keys the `model` section accepts: the keys of
every model, plus the variant's own (listed per variant below).
"""

FOOTER = """\
## More on some keys

- `model.objective` (`decoder_only`): `mse` is a squared error, so it needs the Gaussian
  likelihood; with `model.likelihood=bernoulli` set `model.objective=marginal`.
- `train.precision`: `bf16` and `fp16` run the networks under autocast; the decoder's output
  and the posterior's parameters are cast to fp32 before any loss term, so the reconstruction
  term, the KL and the ELBO are computed and accumulated in fp32, and validation runs in fp32.
  `fp16` adds a gradient scaler, saved with the checkpoint. On a CPU only bf16 is fast, and
  only where the CPU has native bf16 ([performance.md](performance.md)).
- `train.compile`: on one GPU with CUDA graphs (mode `reduce-overhead`); under torchrun the
  default mode. If the first, compiling step fails the run falls back to eager and says so.
- `train.fused_adam`: `python benchmarks/optimizer.py` (CelebA-64 net, 2 CPU cores) measured
  1.9 ms per Adam step fused, against 9.6 ms foreach and 14.1 ms for-loop.
- `train.log_every`: between two reads of the loss there is no host-device synchronisation.
- `train.cpu_memory_cache`: the process keeps the memory it frees for its next allocations
  (glibc's `mallopt`) instead of unmapping every block of 32 MiB or more and faulting its pages
  in again at the next step; its resident memory then stays at its peak. The CelebA-64 plain
  fp32 loop alone runs 1.6-2.2x faster with it, the MNIST one about 1.3-1.4x
  ([benchmarks/README.md](../benchmarks/README.md)).
- `train.fast_layers`: the convolutions take the faster paths of `vaelab/nets/fast.py` (a
  transposed convolution's bias gradient as a plain sum; a convolution over at most 4 pixels as
  one matrix product; a stride-1 convolution with at most 4 output channels, the output layer,
  computed for 2x2 output pixels at once, and its backward as two matrix products over the taps
  of its output gradient), and a LeakyReLU right after a batch norm overwrites the norm's
  output. Same parameters, same results up to rounding (tested equal to 1e-12 in fp64).
- `train.tensorboard` needs the optional extra: `pip install 'vaelab[tensorboard]'`.
"""


# -- reading the comments ------------------------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its description, for the fields that ``cls``'s own body declares: the
    comment lines right above the field, then the comment at the end of its line(s)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    found = {}
    for item in node.body:
        if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
            continue
        above, line = [], item.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        end = item.end_lineno or item.lineno
        after = [
            comments[n][0]
            for n in range(item.lineno, end + 1)
            if n in comments and not comments[n][1]
        ]
        found[item.target.id] = " ".join(part for part in [*above, *after] if part)
    return found


# -- the page ------------------------------------------------------------------------------------
def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def show_default(value: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(show_default(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(cls: type, section: str, names: list[str] | None = None) -> list[str]:
    """Markdown rows of ``cls``'s fields (all, or ``names``): key, type, default, meaning."""
    hints, docs = typing.get_type_hints(cls), {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins for a field it redeclares
        if dataclasses.is_dataclass(klass) and klass.__module__.startswith("vaelab"):
            docs.update(field_comments(klass))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if names is None or f.name in names:
            kind, default = type_name(hints[f.name]), show_default(f.default)
            what = cell(docs.get(f.name, ""))
            rows.append(f"| `{section}.{f.name}` | {kind} | `{default}` | {what} |")
    return rows


# A sentence ends at a full stop before a space or the end, except in "et al." and "e.g.".
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.(?=\s|$)")


def summary(cls: type) -> str:
    """The first sentence of the docstring of the module that defines ``cls``, on one line."""
    doc = " ".join((inspect.getdoc(sys.modules[cls.__module__]) or "").split())
    end = _SENTENCE_END.search(doc)
    return doc[: end.end()] if end else doc


def variants() -> dict[str, type[ModelConfig]]:
    """vaelab's own model variants (a model registered from outside vaelab is not on the page)."""
    from vaelab.models import MODELS

    return {
        n: c
        for n, c in sorted(MODEL_CONFIGS.items())
        if n in MODELS and MODELS[n].__module__.startswith("vaelab.models.")
    }


def reference() -> str:
    """docs/config.md: every key, its type, default and meaning, from the config dataclasses."""
    base = {f.name for f in dataclasses.fields(ModelConfig)}
    out = [HEADER]
    out += ["## `data`", "", *table(DataConfig, "data"), ""]
    out += ["## `model`: every model", "", *table(ModelConfig, "model"), ""]
    out += ["## `model`: each variant's own keys", ""]
    out += [
        "A variant's keys come with its `model.name`; a key of every model that a variant "
        "declares again has that variant's default. What each variant changes: "
        "[variants.md](variants.md).",
        "",
    ]
    for name, cls in variants().items():
        own_names = [n for n in vars(cls).get("__annotations__", {}) if n != "name"]
        where = cls.__module__.replace(".", "/") + ".py"
        out += [f"### `{name}`", "", f"{summary(cls)} (`{cls.__name__}`, `src/{where}`)", ""]
        if own_names:
            out += [*table(cls, "model", own_names), ""]
        else:
            out += [f"No keys beyond those of every model; `model.name={name}`.", ""]
        redeclared = [n for n in own_names if n in base]
        if redeclared:
            out += [f"(Redeclared with this model's default: {', '.join(redeclared)}.)", ""]
    out += ["## `train`", "", *table(TrainConfig, "train"), "", FOOTER]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaelab.reference", description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the page to PATH (docs/config.md)")
    args = parser.parse_args(argv)
    text = reference()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
