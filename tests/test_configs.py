"""Every YAML in configs/ parses with the command in its first line (stale configs fail here)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from asft_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _commands(path: Path) -> list[list[str]]:
    """The ``asft ...`` commands of the header line that name this file (``asft`` itself dropped)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# asft "), f"{path}: first line must be the command that runs it, got {first!r}"
    rel = str(path.relative_to(REPO))
    commands = [shlex.split(part) for part in first[2:].split("&&")]
    return [c[1:] for c in commands if rel in c]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path, capsys):
    assert yaml.safe_load(path.read_text()), f"{path} is empty"
    commands = _commands(path)
    assert commands, f"{path}: the header command does not name the file"
    for args in commands:
        args = [str(REPO / a) if a == str(path.relative_to(REPO)) else a for a in args]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        printed = yaml.safe_load(capsys.readouterr().out)
        assert isinstance(printed, dict) and printed
