"""The README's code cannot drift from the code: its Python blocks run, its console blocks give
the output they show, and every `vaelab ...` line of a shell block (README and docs/) parses with
vaelab's own argument parser, with configs and overrides that load."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vaelab.cli import build_parser, main, parse_args
from vaelab.config import MODEL_CONFIGS, NET_UPSAMPLES, load_config
from vaelab.metrics import METRICS
from vaelab.models import MODELS
from vaelab.nets import NETS
from vaelab.sweep import plan

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(page: Path, *languages: str) -> list[tuple[str, int]]:
    """(text, line number) of each fenced block of ``page`` in one of ``languages``."""
    text = page.read_text(encoding="utf-8")
    return [
        (m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
        if m.group(1) in languages
    ]


def vaelab_lines(page: Path) -> list[tuple[str, list[str]]]:
    """(where, the arguments after `vaelab`) of each command line in a bash or sh block, also
    `torchrun ... -m vaelab ...` and `python -m vaelab ...`; comments and line ends with a
    backslash joined as the shell would."""
    found = []
    for text, first in blocks(page, "bash", "sh"):
        for offset, line in enumerate(text.replace("\\\n", " ").splitlines()):
            words = shlex.split(line, comments=True)
            if words[:1] == ["vaelab"]:
                found.append((f"{page.name}:{first + offset}", words[1:]))
            elif "-m" in words and words[words.index("-m") + 1 :][:1] == ["vaelab"]:
                found.append((f"{page.name}:{first + offset}", words[words.index("-m") + 2 :]))
    return found


ALL_LINES = [line for page in PAGES for line in vaelab_lines(page)]


def is_synopsis(words: list[str]) -> bool:
    """A usage line with placeholders ([CONFIG], val|test, RUN ...), not a command to run."""
    return any(w.startswith("[") or "|" in w or "..." in w for w in words)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_readme_shows_vaelab_commands():
    readme = [args for where, args in ALL_LINES if where.startswith("README")]
    assert len(readme) >= 15
    assert {args[0] for args in readme} >= set(subcommands())  # every command is shown


@pytest.mark.parametrize(("where", "words"), ALL_LINES, ids=[w for w, _ in ALL_LINES])
def test_shell_lines_use_real_commands_and_options(where, words, tmp_path, monkeypatch):
    commands = subcommands()
    assert words and words[0] in commands, f"{where}: no vaelab command {words[:1]}"
    if is_synopsis(words):  # every option it names is one that command takes
        options = {o for a in commands[words[0]]._actions for o in a.option_strings}
        for word in words[1:]:
            flag = word.strip("[]")
            if flag.startswith("-"):
                assert flag in options, f"{where}: `vaelab {words[0]}` has no option {flag}"
        return
    monkeypatch.chdir(tmp_path)  # a file named like a shipped config must not shadow it
    args = parse_args(words)  # SystemExit(2), with the one-line error, if it does not parse
    config_args = [a for a in getattr(args, "items", []) if "=" not in a]
    overrides = [a for a in getattr(args, "items", []) if "=" in a]
    config = config_args[0] if config_args else None
    if args.command == "sweep":
        plan(config, overrides)
    elif args.command in ("train", "prepare", "config") and not getattr(args, "resume", None):
        load_config(config, overrides)


def console_examples(page: Path) -> list[tuple[str, str, str]]:
    """(where, command, the output shown under it) for each `$ vaelab ...` of a console block."""
    examples = []
    for text, first in blocks(page, "console"):
        lines = text.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(lines)
            output = "\n".join(lines[start + 1 : end])
            examples.append((f"{page.name}:{first + start + 1}", lines[start][2:], output))
    return examples


CONSOLE = console_examples(README)


@pytest.mark.parametrize(("where", "command", "shown"), CONSOLE, ids=[w for w, _, _ in CONSOLE])
def test_console_examples_print_what_the_readme_shows(
    where, command, shown, tmp_path, monkeypatch, capsys
):
    words = shlex.split(command)
    assert words[0] == "vaelab"
    monkeypatch.chdir(tmp_path)
    code = main(words[1:])
    captured = capsys.readouterr()
    assert (captured.out + captured.err).strip() == shown.strip(), where
    if shown.startswith("vaelab: error:"):  # a refusal: exit code 2 and nothing written
        assert code == 2 and list(tmp_path.iterdir()) == []
    else:
        assert code == 0


def test_the_readme_has_console_examples():
    assert any("model.bta" in command for _, command, _ in CONSOLE)


PYTHON = [
    (code, f"{page.name}:{line}")
    for page in (README, ROOT / "docs" / "extending.md")
    for code, line in blocks(page, "python")
]


@pytest.mark.parametrize(("code", "where"), PYTHON, ids=[w for _, w in PYTHON])
def test_python_blocks_run(code, where, tmp_path, monkeypatch):
    """Each block runs on its own, in an empty folder (it may train a small run there). The
    models, metrics and nets it registers are unregistered after it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    registries = (MODELS, MODEL_CONFIGS, METRICS, NETS, NET_UPSAMPLES)
    before = [dict(r) for r in registries]
    try:
        exec(compile(code, where, "exec"), {"__name__": "readme"})
    finally:
        for registry, kept in zip(registries, before, strict=True):
            registry.clear()
            registry.update(kept)


def test_the_python_api_block_is_there():
    assert any("vaelab.load_config" in code and "vaelab.train" in code for code, _ in PYTHON)
