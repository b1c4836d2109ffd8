"""Does a PEFT adapter fit a base model? Checked from the files alone, before PEFT loads anything.

``asft evaluate``, ``asft restore`` and ``asft basin`` refuse an adapter made for another base model with one line
that names both and the first module that differs (:class:`AdapterMismatchError`), instead of PEFT's size-mismatch
traceback; a missing or unreadable adapter file is a :class:`~asft_lightning.checkpoints.CheckpointError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from asft_lightning.checkpoints import CheckpointError
from asft_lightning.errors import AsftError, InputNotFoundError

__all__ = ["AdapterMismatchError", "adapter_files", "check_adapter", "lora_shapes"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(AsftError, ValueError):
    """An adapter that does not fit the base model (made for another one). The message names both and the module."""


def adapter_files(adapter: str) -> tuple[dict[str, Any], Path]:
    """``(adapter_config.json as a dict, the weights file)`` of a PEFT adapter directory, or the error to show."""
    root = Path(adapter).expanduser()
    if not root.is_dir():
        raise InputNotFoundError(
            f"adapter={adapter!r}: no such directory; expected a PEFT adapter directory (save_pretrained output)"
        )
    cfg = root / ADAPTER_CONFIG
    if not cfg.is_file():
        raise CheckpointError(f"adapter={adapter!r}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"adapter={adapter!r}: {cfg} is not valid JSON ({err})") from err
    weights = next((root / w for w in ADAPTER_WEIGHTS if (root / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"adapter={adapter!r}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return config, weights


def lora_shapes(weights: Path, adapter: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module name in the base model: {"A": shape, "B": shape}}`` from the adapter's weight file."""
    import re

    pattern = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
    except Exception as err:
        raise CheckpointError(f"adapter={adapter!r}: cannot read {weights.name} ({err})") from err
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = pattern.match(key)
        if m is None:
            continue
        name = m["module"]
        name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        modules.setdefault(name, {})[m["which"]] = shape
    return modules


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (``nn.Linear``, GPT-2's ``Conv1D``), else ``None``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (
        hasattr(module, "nf") and weight is not None and weight.ndim == 2
    ):  # transformers Conv1D: weight (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def check_adapter(adapter: str, base: torch.nn.Module, model_name: str) -> dict[str, Any]:
    """Check that a LoRA adapter fits ``base``: every adapted module exists there with matching shapes.

    Base-model paths in ``adapter_config.json`` differ between machines, so they are not compared; the weights
    are: ``lora_A`` is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)`` of the base ``Linear``.

    Args:
        adapter: the PEFT adapter directory.
        base: the loaded base model (before PEFT wraps it).
        model_name: the base model's path, for messages.

    Returns:
        The adapter config.

    Raises:
        AdapterMismatchError: a module is missing from ``base`` or its shapes differ.
    """
    config, weights = adapter_files(adapter)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return config  # other PEFT types: PEFT's own loader checks them
    modules = lora_shapes(weights, adapter)
    if not modules:
        raise CheckpointError(
            f"adapter={adapter!r}: {weights.name} holds no lora_A / lora_B weights; is it a LoRA adapter?"
        )
    named = dict(base.named_modules())
    for name in sorted(modules):
        pair = modules[name]
        if "A" not in pair or "B" not in pair:
            raise CheckpointError(
                f"adapter={adapter!r}: module {name!r} has lora_{'A' if 'A' in pair else 'B'} only"
            )
        if name not in named:
            example = next((n for n in named if n.endswith(name.rsplit(".", 1)[-1])), None)
            hint = f" (the base model has e.g. {example!r})" if example else ""
            raise AdapterMismatchError(
                f"adapter {adapter!r} does not fit model {model_name!r}: the adapter's module {name!r} is not in the "
                f"base model{hint}; was the adapter made for another base model?"
            )
        shape = _linear_shape(named[name])
        a, b = pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise CheckpointError(
                f"adapter={adapter!r}: module {name!r}: lora_A {a} and lora_B {b} do not form a LoRA pair"
            )
        if shape is not None and (a[1], b[0]) != shape:
            raise AdapterMismatchError(
                f"adapter {adapter!r} does not fit model {model_name!r}: module {name!r}: the adapter's lora_A {a} / "
                f"lora_B {b} are for a {a[1]} -> {b[0]} layer, but the base layer is {shape[0]} -> {shape[1]}; "
                "was the adapter made for another base model?"
            )
    return config
