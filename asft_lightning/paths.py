"""Where asft-lightning keeps its caches: the offline world, benchmark rows, fetched archives.

The rule follows Hugging Face's cache: one root for the user, shared by every checkout, so a fresh clone reuses a
world that took half an hour to build.

1. ``$ASFT_CACHE_DIR`` when set (an explicit choice wins);
2. else ``$XDG_CACHE_HOME/asft-lightning`` when ``XDG_CACHE_HOME`` is set;
3. else ``~/.cache/asft-lightning``.

Commands that take a ``--cache_dir`` / ``--world`` flag use the flag over all three.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root", "default_world_dir"]

CACHE_ENV = "ASFT_CACHE_DIR"
"""Environment variable that overrides the cache root."""


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """The cache root (see the module docstring for the rule).

    Args:
        environ: The environment to read (default ``os.environ``); tests pass their own.

    Returns:
        An absolute path; it is not created here.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    if xdg:
        return (Path(xdg).expanduser() / "asft-lightning").absolute()
    home = env.get("HOME", "").strip()
    base = Path(home) if home else Path.home()
    return (base / ".cache" / "asft-lightning").absolute()


def default_world_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of the offline SmolLM2 safety world: ``<cache root>/world``."""
    return cache_root(environ) / "world"
