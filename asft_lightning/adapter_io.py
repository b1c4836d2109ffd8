"""PEFT LoRA adapter directories for the post-hoc commands (Safe LoRA, RESTA, SafeMERGE): read, check, write.

An adapter directory is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``base_model.model.<module>.lora_A.weight`` (``r x d_in``) and
``...lora_B.weight`` (``d_out x r``) per module. A module's update is ``s B A`` with the LoRA scaling
``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``; ``alpha`` from ``alpha_pattern`` where a pattern
matches, as PEFT resolves it).

Everything here only reads its inputs. The commands write their outputs through
:func:`asft_lightning.fileio.atomic_replace_dir`; :func:`check_output` refuses an output that would replace or sit
inside an input, and a non-empty one unless ``overwrite`` is set. :func:`merged_config` gives the config of an
adapter whose scaling has been folded into ``B`` (``lora_alpha = r``, so ``s = 1``), the form the RESTA and
SafeMERGE outputs take because their ranks differ from the input's.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from asft_lightning.errors import AsftError, OutputExistsError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "AdapterError",
    "LoraAdapter",
    "check_output",
    "copy_side_files",
    "lora_modules",
    "lora_scaling",
    "merged_config",
    "module_shapes",
    "natural_key",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Prefix PEFT puts before the base model's module names in a saved adapter.
PEFT_PREFIX = "base_model.model."
#: ``<module>.lora_A.weight`` or ``<module>.lora_A.<adapter name>.weight`` (some PEFT versions keep the name).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class AdapterError(AsftError, ValueError):
    """An adapter directory that cannot be used. The message names the file, module or tensor."""


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def lora_modules(
    state: dict[str, Any], source: str = "adapter", error: type[Exception] = AdapterError
) -> dict[str, tuple[str, str]]:
    """Find the LoRA pairs in an adapter state dict (or any mapping with its keys).

    Args:
        state: the adapter's tensors, keyed as PEFT saves them
            (``base_model.model.<module>.lora_A[.<adapter name>].weight``).
        source: what to call the state in error messages (e.g. the file path).
        error: the exception class to raise.

    Returns:
        Base-model module name (``base_model.model.`` stripped) -> ``(lora_A key, lora_B key)``, in natural order.
    """
    found: dict[str, dict[str, str]] = {}
    adapter_names: set[str | None] = set()
    for key in state:
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        module = m["module"]
        module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        adapter_names.add(m["adapter"])
        slot = found.setdefault(module, {})
        if m["which"] in slot:
            raise error(
                f"{source}: two lora_{m['which']} tensors for module {module}: '{slot[m['which']]}' and '{key}'"
            )
        slot[m["which"]] = key
    if not found:
        sample = sorted(state)[:5]
        raise error(
            f"{source}: no LoRA tensors (keys like '<module>.lora_A.weight' / '.lora_B.weight'); "
            f"is this a LoRA adapter? First keys: {sample}"
        )
    if len(adapter_names) > 1:
        names = sorted(str(n) for n in adapter_names)
        raise error(f"{source}: tensors of several adapters ({names}); save one adapter per directory")
    out = {}
    for module in sorted(found, key=natural_key):
        slot = found[module]
        for which in "AB":
            if which not in slot:
                other = slot["B" if which == "A" else "A"]
                raise error(f"{source}: module {module} has '{other}' but no lora_{which} tensor")
        out[module] = (slot["A"], slot["B"])
    return out


def module_shapes(
    state: dict[str, Tensor],
    pairs: dict[str, tuple[str, str]],
    source: str,
    error: type[Exception] = AdapterError,
) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` per module from ``lora_B.shape[0]`` and ``lora_A.shape[1]``, checking the factors agree
    (matrices, equal rank, floating point, finite)."""
    shapes = {}
    for module, (a_key, b_key) in pairs.items():
        a, b = state[a_key], state[b_key]
        if a.ndim != 2 or b.ndim != 2:
            raise error(
                f"{source}: module {module}: LoRA factors must be matrices, got '{a_key}' {tuple(a.shape)} "
                f"and '{b_key}' {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise error(
                f"{source}: module {module}: rank mismatch, '{a_key}' is {tuple(a.shape)} (r, d_in) but "
                f"'{b_key}' is {tuple(b.shape)} (d_out, r)"
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise error(f"{source}: module {module}: LoRA factors must be floating point, got {a.dtype}")
        for key, t in ((a_key, a), (b_key, b)):
            if not torch.isfinite(t).all():
                raise error(f"{source}: tensor '{key}' has non-finite values")
        shapes[module] = (int(b.shape[0]), int(a.shape[1]))
    return shapes


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """The scaling ``s`` PEFT applies to ``B A`` for ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    ``alpha`` is ``alpha_pattern[key]`` for the first pattern key that matches the module name the way PEFT
    matches it (``(.*\\.)?(key)$``), else ``lora_alpha`` (PEFT's default 8).
    """
    alpha = config.get("lora_alpha", 8)
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    alpha = float(alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from disk.

    Attributes:
        path: the adapter directory.
        config: ``adapter_config.json``.
        tensors: every tensor of ``adapter_model.safetensors`` (LoRA factors and anything else it holds).
        header: the safetensors header metadata.
        pairs: module name -> ``(lora_A key, lora_B key)``.
        shapes: module name -> ``(d_out, d_in)``.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    header: dict[str, str]
    pairs: dict[str, tuple[str, str]]
    shapes: dict[str, tuple[int, int]]

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    def rank(self, module: str) -> int:
        return int(self.tensors[self.pairs[module][0]].shape[0])

    def scaling(self, module: str) -> float:
        """PEFT's ``s`` for ``module`` (see :func:`lora_scaling`)."""
        return lora_scaling(self.config, module, self.rank(module))

    def factors(self, module: str, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of ``module`` in ``dtype``."""
        a_key, b_key = self.pairs[module]
        return self.tensors[a_key].to(dtype), self.tensors[b_key].to(dtype)

    def other_tensors(self) -> list[str]:
        """Keys that are not LoRA factors (``modules_to_save`` copies, LoRA biases, ...)."""
        lora = {k for pair in self.pairs.values() for k in pair}
        return sorted(k for k in self.tensors if k not in lora)


def read_adapter(
    adapter: str | Path,
    error: type[Exception] = AdapterError,
    method: str = "this command",
    flag: str = "adapter",
) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
        adapter: the directory.
        error: the exception class to raise.
        method: what to call the caller in messages ("Safe LoRA", "RESTA", ...).
        flag: the argument that named the directory, for messages.

    Raises:
        error: missing or unreadable files, not a (plain) LoRA adapter, inconsistent or non-finite factors.
    """
    adapter = Path(adapter)
    if not adapter.exists():
        raise error(f"{adapter}: adapter directory not found ({flag})")
    if not adapter.is_dir():
        raise error(
            f"{adapter}: not a directory; give the PEFT adapter directory (save_pretrained output) as {flag}"
        )
    cfg_path = adapter / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise error(f"{cfg_path}: missing; expected a PEFT adapter directory (save_pretrained output)")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise error(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise error(
            f"{cfg_path}: peft_type is {config.get('peft_type')!r}; {method} works on LoRA adapters only"
        )
    if config.get("use_dora"):
        raise error(f"{cfg_path}: a DoRA adapter (use_dora: true); {method} is defined for plain LoRA only")
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (adapter / "adapter_model.bin").is_file()
            else ""
        )
        raise error(f"{weights}: missing{hint}")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            header = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise error(f"{weights}: corrupt or unreadable safetensors file ({err})") from err
    pairs = lora_modules(tensors, str(weights), error)
    shapes = module_shapes(tensors, pairs, str(weights), error)
    return LoraAdapter(adapter, config, tensors, header, pairs, shapes)


def _inside(child: Path, parent: Path) -> bool:
    c, p = child.resolve(), parent.resolve()
    return c == p or p in c.parents


def check_output(
    output: Path,
    inputs: dict[str, Path],
    overwrite: bool,
    error: type[Exception] = AdapterError,
    exists_error: type[Exception] = OutputExistsError,
) -> None:
    """Refuse an output directory that is, holds or sits inside an input, or exists non-empty without ``overwrite``.

    Args:
        output: the directory to write.
        inputs: what each input is (e.g. ``"adapter directory"``) -> its path (directories and files).
        overwrite: whether a non-empty ``output`` may be replaced.
        error: the exception class for a clash with an input.
        exists_error: the exception class for an existing output.
    """
    for what, path in inputs.items():
        if _inside(output, path) or _inside(path, output):
            raise error(f"{output}: the output must not be the input {what} {path}, inside it, or contain it")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise exists_error(f"{output}: exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise exists_error(f"{output}: exists and is not empty; pass overwrite=True to replace it")


def copy_side_files(source: Path, dest: Path, skip: set[str]) -> list[str]:
    """Copy the plain files of an adapter directory (README, tokenizer, ...) except weights, reports and ``skip``."""
    copied = []
    for src in sorted(source.iterdir()):
        if not src.is_file() or src.name in skip or src.name.startswith("adapter_model."):
            continue
        if src.name.endswith("_report.json"):  # another command's report does not describe the new adapter
            continue
        shutil.copy2(src, dest / src.name)
        copied.append(src.name)
    return copied


def merged_config(config: dict[str, Any], rank: int) -> dict[str, Any]:
    """The adapter config for factors whose LoRA scaling is folded into ``B``: ``r = lora_alpha = rank``,
    no rsLoRA, no rank or alpha patterns, so PEFT's ``s`` is 1 for every module."""
    out = dict(config)
    out.update(r=int(rank), lora_alpha=int(rank), use_rslora=False, rank_pattern={}, alpha_pattern={})
    return out
