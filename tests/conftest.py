"""Shared fixtures: a tiny offline safety world built once per test session (no hub, no network)."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny world (see ``asft_lightning.tiny``): aligned (3 shards), unaligned, task, harmful."""
    from asft_lightning.tiny import build_tiny_world

    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_direction(tiny_world, tmp_path_factory) -> str:
    """A safelora (full V) direction file for the tiny world's q_proj / v_proj."""
    from asft_lightning.direction import extract_direction

    path = tmp_path_factory.mktemp("direction") / "direction.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(path))
    return str(path)
