"""docs/config.md is generated from the config dataclasses, and the committed page is current."""

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from vaelab.config import DataConfig, ModelConfig, TrainConfig
from vaelab.reference import COMMAND, field_comments, reference, variants

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_the_committed_page_is_the_generated_one():
    assert PAGE.read_text(encoding="utf-8") == reference(), (
        f"docs/config.md is not what the config dataclasses give: regenerate it with `{COMMAND}` "
        "(run in the repository root)"
    )


def test_every_key_is_on_the_page_with_a_description():
    rows = dict(
        re.findall(
            r"^\| `([a-z_]+\.[a-z_0-9]+)` \| [^|]+ \| `[^`]*` \| (.*) \|$", reference(), re.M
        )
    )
    keys = [f"data.{f.name}" for f in dataclasses.fields(DataConfig)]
    keys += [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    keys += [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    for cls in variants().values():
        keys += [f"model.{f.name}" for f in dataclasses.fields(cls)]
    assert set(keys) <= set(rows), set(keys) - set(rows)
    undescribed = sorted(k for k, meaning in rows.items() if not meaning.strip())
    assert not undescribed, f"fields without a comment to describe them: {undescribed}"
    assert {"decoder_only", "vae", "beta_vae", "iwae"} <= set(variants())
    for name in variants():
        assert f"### `{name}`" in reference()


@dataclass(frozen=True)
class Example:
    plain: int = 1  # at the end of its line
    # above it,
    # on two lines
    above: str = "x"
    # above
    both: float = 0.5  # and after
    no_comment: bool = True
    spread: tuple[int, ...] = (  # a value over
        1,
        2,
    )


def test_descriptions_are_read_from_the_source_comments():
    assert field_comments(Example) == {
        "plain": "at the end of its line",
        "above": "above it, on two lines",
        "both": "above and after",
        "no_comment": "",
        "spread": "a value over",
    }


def test_a_variant_redeclaring_a_key_shows_its_own_default():
    page = reference()
    iwae = page.split("### `iwae`")[1].split("###")[0]
    assert "| `model.mc_samples` | int | `5` | K importance samples per image |" in iwae
    assert "| `model.mc_samples` | int | `1` |" in page  # every model's default, above
