"""The repository documents itself: config.toml, the README's commands, the Lua headers.

These fail when code and documentation drift apart: a settings field without a
line in config.toml, a default that differs, a README test command that CI does
not run, a script without its contract.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from chatd import config
from chatd.scripts import sources

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config.toml"
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
LUA = ROOT / "lua"

RUN_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && chatd"
TEST_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' "
                "&& pytest")


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(config.Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(config.Settings)}


def readme_commands() -> list[str]:
    """Indented (4-space) code lines of the README, in order."""
    return [line[4:].strip() for line in README.read_text().splitlines()
            if line.startswith("    ") and line.strip()]


# --- config.toml ----------------------------------------------------------------------------


def test_config_toml_parses() -> None:
    with CONFIG.open("rb") as f:
        data = tomllib.load(f)
    assert set(data) == set(section_classes())


def test_config_toml_holds_exactly_the_defaults() -> None:
    assert config.load(CONFIG, {}, {}) == config.Settings()


def test_config_toml_documents_every_key() -> None:
    with CONFIG.open("rb") as f:
        data = tomllib.load(f)
    for section, cls in section_classes().items():
        fields = {f.name for f in dataclasses.fields(cls)}
        listed = set(data.get(section, {}))
        assert fields - listed == set(), f"[{section}] misses keys {sorted(fields - listed)}"
        assert listed - fields == set(), f"[{section}] has unknown keys {sorted(listed - fields)}"


def test_config_toml_explains_every_key() -> None:
    """Each `key = value` line carries a comment: on it, just above it, or shared with the
    key line above it of the same family (`argon2_time_cost` explains `argon2_*`)."""
    lines = CONFIG.read_text().splitlines()
    unexplained = []
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z_0-9]+)\s*=", line)
        if not m or "#" in line or (i > 0 and lines[i - 1].lstrip().startswith("#")):
            continue
        above = re.match(r"^([a-z_0-9]+)\s*=", lines[i - 1]) if i > 0 else None
        family = m.group(1).split("_")[0]
        if above and above.group(1).split("_")[0] == family:
            continue
        unexplained.append(m.group(1))
    assert unexplained == []


# --- README and CI --------------------------------------------------------------------------


def test_readme_first_two_commands() -> None:
    commands = readme_commands()
    assert commands[:2] == [RUN_COMMAND, TEST_COMMAND]


def test_readme_test_command_is_what_ci_runs() -> None:
    last = [line for line in CI_RUN.read_text().splitlines() if line.strip()][-1]
    assert readme_commands()[1] == last.strip()
    assert last.strip() == TEST_COMMAND


def test_ci_run_is_executable_bash() -> None:
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert CI_RUN.stat().st_mode & 0o111


# --- Lua headers ----------------------------------------------------------------------------

SCRIPTS = sorted(p for p in LUA.glob("*.lua") if not p.name.startswith("_"))


def header_of(path: Path) -> str:
    text = path.read_text()
    assert text.startswith(f"--[[ {path.stem}:"), f"{path.name} must open with its header"
    end = text.find("]]")
    assert end > 0, f"{path.name}: unterminated header comment"
    return text[:end]


def test_there_are_scripts() -> None:
    names = {p.stem for p in SCRIPTS}
    assert {"send_message", "take_token", "mark_seen"} <= names
    assert names == set(sources())  # the loader ships exactly these


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_lua_header(path: Path) -> None:
    header = header_of(path)
    assert re.search(r"^KEYS\[1\]", header, re.M), f"{path.name}: header lacks KEYS"
    assert re.search(r"^ARGV\[1\]", header, re.M), f"{path.name}: header lacks ARGV"
    assert re.search(r"^Returns\s+\S", header, re.M), f"{path.name}: header lacks Returns"
    assert re.search(r"^Invariant:\s*\S", header, re.M), f"{path.name}: header lacks Invariant"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_lua_header_lists_every_key_and_arg_used(path: Path) -> None:
    """Every KEYS[i] / ARGV[i] the body reads is described in the header."""
    header = header_of(path)
    body = path.read_text()[len(header):]
    for kind in ("KEYS", "ARGV"):
        used = {int(n) for n in re.findall(kind + r"\[(\d+)\]", body)}
        documented = {int(a) for a, _ in re.findall(
            "^" + kind + r"\[(\d+)(?:\.\.(\d+|n)?)?\]", header, re.M)}
        ranges = re.findall("^" + kind + r"\[(\d+)\.\.", header, re.M)
        lowest_range = min((int(r) for r in ranges), default=None)
        missing = {n for n in used - documented
                   if lowest_range is None or n < lowest_range}
        assert not missing, f"{path.name}: {kind}{sorted(missing)} used but not in the header"
