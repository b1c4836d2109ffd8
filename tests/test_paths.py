"""The cache location rule: $ASFT_CACHE_DIR, else $XDG_CACHE_HOME/asft-lightning, else ~/.cache/asft-lightning."""

from __future__ import annotations

from pathlib import Path

from asft_lightning.paths import cache_root, default_world_dir


def test_explicit_variable_wins(tmp_path):
    env = {"ASFT_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    assert cache_root(env) == tmp_path / "mine"
    assert default_world_dir(env) == tmp_path / "mine" / "world"


def test_xdg_then_home(tmp_path):
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HOME": "/nowhere"}) == tmp_path / "xdg" / "asft-lightning"
    assert cache_root({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "asft-lightning"
    assert cache_root({"ASFT_CACHE_DIR": "  ", "XDG_CACHE_HOME": "", "HOME": str(tmp_path)}) == (
        tmp_path / ".cache" / "asft-lightning")


def test_relative_and_user_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cache_root({"ASFT_CACHE_DIR": "rel"}) == tmp_path / "rel"
    assert cache_root({"ASFT_CACHE_DIR": "~/c", "HOME": str(tmp_path)}).is_absolute()
    assert isinstance(cache_root(), Path)
