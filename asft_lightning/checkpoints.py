"""Read-only, tensor-by-tensor access to model checkpoints: HF safetensors directories and GGUF files.

A :class:`CheckpointReader` never loads a whole safetensors model: ``get`` memory-maps one tensor from its
shard. GGUF files are dequantised by transformers (the same code path as ``from_pretrained(..., gguf_file=)``),
which materialises that one model; only the requested tensors are kept afterwards.
Nothing here ever writes to a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from asft_lightning.errors import AsftError
from asft_lightning.fileio import sha256_file  # noqa: F401 (its old home)

#: config.json fields that must agree between two checkpoints for their weights to be comparable.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


class CheckpointError(AsftError, ValueError):
    """A checkpoint is missing, corrupt, or not what was expected. The message names the file."""


def split_gguf(path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Normalise ``(directory, gguf file name)`` from either a ``.gguf`` path or a directory plus file name."""
    if gguf_file is None and str(path).endswith(".gguf"):
        p = Path(path)
        return str(p.parent), p.name
    return str(path), gguf_file


def architecture_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The subset of a model config that determines its weight shapes (see :data:`ARCHITECTURE_FIELDS`)."""
    return {k: config[k] for k in ARCHITECTURE_FIELDS if config.get(k) is not None}


def load_model_config(path: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The model config as a dict, from ``config.json`` or from the GGUF header via transformers."""
    directory, gguf = split_gguf(path, gguf_file)
    if gguf is None:
        cfg = Path(directory) / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{cfg}: missing; expected a Hugging Face model directory with config.json")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg}: not valid JSON ({err})") from err
    gguf_path = Path(directory) / gguf
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: GGUF file not found")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf).to_dict()
    except Exception as err:  # transformers raises many types for a bad header
        raise CheckpointError(f"{gguf_path}: cannot read the GGUF header ({err})") from err


class CheckpointReader:
    """Tensor-by-tensor reader over one checkpoint.

    Args:
        path: a Hugging Face model directory (``model.safetensors`` or a sharded
            ``model.safetensors.index.json``), or a ``.gguf`` file, or a directory holding ``gguf_file``.
        gguf_file: name of the GGUF file inside ``path``.
    """

    def __init__(self, path: str, gguf_file: str | None = None) -> None:
        self.path, self.gguf_file = split_gguf(path, gguf_file)
        root = Path(self.path)
        if not root.exists():
            raise CheckpointError(f"{root}: checkpoint not found")
        self.config = load_model_config(self.path, self.gguf_file)
        self._weight_map: dict[str, str] = {}
        self._gguf_state: dict[str, Tensor] | None = None
        if self.gguf_file is not None:
            self.files = [root / self.gguf_file]
            return
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map')") from err
            self._weight_map = {k: str(root / v) for k, v in weight_map.items()}
        elif single.is_file():
            self._weight_map = {k: str(single) for k in self._keys_of(single)}
        else:
            raise CheckpointError(
                f"{root}: no model.safetensors or model.safetensors.index.json; "
                "expected a Hugging Face safetensors directory or a GGUF file"
            )
        self.files = sorted({Path(p) for p in self._weight_map.values()})
        for shard in self.files:
            if not shard.is_file():
                raise CheckpointError(f"{shard}: shard listed in the index is missing")
        self._shapes = {}
        for shard in self.files:
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    for key in fh.keys():
                        self._shapes[key] = tuple(fh.get_slice(key).get_shape())
            except Exception as err:
                raise CheckpointError(f"{shard}: corrupt safetensors file ({err})") from err

    @staticmethod
    def _keys_of(shard: Path) -> list[str]:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                return list(fh.keys())
        except Exception as err:
            raise CheckpointError(f"{shard}: corrupt safetensors file ({err})") from err

    def _load_gguf(self) -> dict[str, Tensor]:
        if self._gguf_state is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                self.path, gguf_file=self.gguf_file, dtype=torch.float32, low_cpu_mem_usage=True
            )
            self._gguf_state = {k: v.detach() for k, v in model.state_dict().items()}
            self._shapes = {k: tuple(v.shape) for k, v in self._gguf_state.items()}
        return self._gguf_state

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint."""
        if self.gguf_file is not None:
            return list(self._load_gguf())
        return list(self._weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of one tensor, read from the header without loading it."""
        if self.gguf_file is not None:
            self._load_gguf()
        return self._shapes[key]

    def get(self, key: str) -> Tensor:
        """Load one tensor (memory-mapped from its shard)."""
        if self.gguf_file is not None:
            return self._load_gguf()[key]
        with safe_open(self._weight_map[key], framework="pt") as fh:
            return fh.get_tensor(key)

    def release(self) -> None:
        """Drop a dequantised GGUF state dict, if one was loaded."""
        self._gguf_state = None

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of every file the weights come from."""
        return {str(f): sha256_file(f) for f in self.files}

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())
