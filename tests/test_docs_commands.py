"""The commands the documentation shows still work as written: every option a `python -m ...` command, a console
script or a `scripts/*.py` tool is given in README.md, docs/ and the shipped READMEs is one its `--help` lists,
every `--set key=value` names a config key and a value it accepts, every `--config` and shipped weight file named
exists, and every `bash scripts/*.sh` exists. A renamed option or config key then fails here, not for a reader who
copies the command."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "models" / "weights").glob("*.md")),
        *sorted((REPO / "examples").glob("*/README.md"))]
CONSOLE_SCRIPTS = {"upscaler-server": "upscaler_server", "takdsr-upscale": "upscaler_server.upscale",
                   "takdsr-bench": "upscaler_server.bench", "takdsr-status": "upscaler_server.status",
                   "takdsr-demo": "client_demo"}
FENCED_BLOCK = re.compile(r"^```[\w-]*\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
PYTHON = re.compile(r"(\S*/)?python3?(\.\d+)?$")
# What a placeholder looks like in the docs (--set KEY=VALUE, --config FILE, --lr=...): not checked
PLACEHOLDER = re.compile(r"\.\.\.|[A-Z]{2,}|\$|<|\*|^key$|^section\.key$")


@dataclass(frozen=True)
class Command:
    doc: str  # the file it is shown in
    text: str  # as shown (continuation lines joined)
    program: tuple[str, ...]  # what --help is asked of: ("-m", module[, subcommand]), (script.py,) or (script.sh,)
    args: tuple[str, ...]  # the words after the program


def _shell_lines(block: str) -> list[str]:
    """The lines of a code block with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [re.sub(r"(^|\s)#(\s.*)?$", "", line) for line in joined.splitlines()]


def _snippets(text: str) -> list[str]:
    blocks = FENCED_BLOCK.findall(text)
    prose = FENCED_BLOCK.sub("", text)
    return [line for block in blocks for line in _shell_lines(block)] + INLINE_CODE.findall(prose)


def _words(part: str) -> list[str]:
    try:
        return shlex.split(part)
    except ValueError:  # an inline span cut mid-quote
        return part.split()


def _command(doc: str, part: str) -> Command | None:
    """The python, console-script or scripts/ command in one `&&`/`;`/`|` part of a line, if it holds one."""
    words = _words(part)
    for index, word in enumerate(words):
        rest = words[index + 1:]
        if PYTHON.match(word):
            while rest and rest[0] in ("-P", "-u", "-B", "-I"):
                rest = rest[1:]
            if len(rest) >= 2 and rest[0] == "-m" and rest[1] != "pytest":
                sub = rest[2:3] if len(rest) > 2 and re.fullmatch(r"[a-z][a-z-]*", rest[2]) else []
                return Command(doc, part.strip(), ("-m", rest[1], *sub), tuple(rest[2 + len(sub):]))
            if rest and re.fullmatch(r"scripts/\w+\.py", rest[0]):
                return Command(doc, part.strip(), (rest[0],), tuple(rest[1:]))
            return None
        if word in CONSOLE_SCRIPTS:
            module = CONSOLE_SCRIPTS[word]
            return Command(doc, part.strip(), ("-m", module), tuple(rest))
        if word == "bash" and rest and re.fullmatch(r"scripts/\w+\.sh", rest[0]):
            return Command(doc, part.strip(), (rest[0],), tuple(rest[1:]))
    return None


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        name = str(doc.relative_to(REPO))
        for snippet in _snippets(doc.read_text()):
            for part in re.split(r"&&|\|\||;|\|", snippet):
                command = _command(name, part)
                if command:
                    commands.append(command)
    return commands


@functools.cache
def help_text(program: tuple[str, ...]) -> str:
    argv = [sys.executable, *program, "--help"] if program[0] == "-m" else [sys.executable, program[0], "--help"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{' '.join(program)} --help` failed: {done.stderr.strip()[-500:]}"
    return done.stdout


def options(args: tuple[str, ...]) -> list[str]:
    return [word.split("=")[0] for word in args if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", word)]


def values_of(flag: str, args: tuple[str, ...]) -> list[str]:
    found = [args[i + 1] for i, word in enumerate(args[:-1]) if word == flag]
    return found + [word.split("=", 1)[1] for word in args if word.startswith(flag + "=")]


COMMANDS = documented_commands()


def test_the_docs_show_commands() -> None:
    """The extraction itself: the README's main commands are found, with their options."""
    shown = {(command.program, command.args) for command in COMMANDS if command.doc == "README.md"}
    assert (("scripts/setup.sh",), ("--dev",)) in shown
    assert any(program == ("-m", "training", "pipeline") and "--config" in args for program, args in shown)
    assert len({command.program for command in COMMANDS}) >= 20


@pytest.mark.parametrize("program", sorted({c.program for c in COMMANDS if c.program[0] == "-m"
                                            or c.program[0].endswith(".py")}), ids=" ".join)
def test_every_documented_option_is_in_the_help(program: tuple[str, ...]) -> None:
    text = help_text(program)
    missing = [f"{command.doc}: {option} in `{command.text}`" for command in COMMANDS if command.program == program
               for option in options(command.args) if not re.search(re.escape(option) + r"(?![\w-])", text)]
    assert not missing, f"options that `{' '.join(program)} --help` does not list:\n" + "\n".join(missing)


def test_every_documented_shell_script_exists() -> None:
    missing = sorted({f"{c.doc}: {c.program[0]}" for c in COMMANDS if c.program[0].endswith(".sh")
                      and not (REPO / c.program[0]).is_file()})
    assert not missing


def test_every_documented_config_exists() -> None:
    """`--config` names a config file or a bundled config's name."""
    from training.config import resolve_config

    named = {(command.doc, name) for command in COMMANDS for name in values_of("--config", command.args)
             if not PLACEHOLDER.search(name)}
    assert any(name == "training/configs/rlfn_x2.toml" for _, name in named)
    missing = sorted(f"{doc}: --config {name}" for doc, name in named if not resolve_config(name).is_file())
    assert not missing


def documented_overrides() -> set[tuple[str, str]]:
    """Every `--set key=value` in the docs, in commands or in prose, but placeholders (`--set optim.lr=...`)."""
    found = set()
    for doc in DOCS:
        for quoted in re.findall(r"--set[ =]+(\"[^\"]*\"|'[^']*'|[^\s`]+)", doc.read_text()):
            override = quoted.strip("\"'").rstrip(",;)")
            key, _, value = override.partition("=")
            if not (PLACEHOLDER.search(key) or PLACEHOLDER.search(value) or re.fullmatch(r"[A-Z]", value)):
                found.add((str(doc.relative_to(REPO)), override))
    return found


def test_every_documented_override_loads() -> None:
    """Each override, applied alone to the paper's config, names a key and a value the config accepts."""
    from training.config import load_config

    overrides = documented_overrides()
    assert len(overrides) >= 30
    failures = []
    for doc, override in sorted(overrides):
        try:
            load_config("rlfn_x2", [override])
        except (ValueError, TypeError) as exc:
            failures.append(f"{doc}: --set {override}: {exc}")
    assert not failures, "\n".join(failures)


def test_every_documented_weight_file_exists() -> None:
    named = {match for doc in DOCS for match in re.findall(r"models/weights/[\w.-]+\.(?:safetensors|json)",
                                                           doc.read_text())}
    assert named, "no shipped weight file is named in the docs"
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing
