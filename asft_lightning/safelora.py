"""Safe LoRA (Hsu et al., arXiv 2405.16833) as a post-hoc projection of an existing PEFT LoRA adapter.

Per LoRA module ``l`` with the projector ``C_l`` of a direction file (:mod:`asft_lightning.direction`; the
published ``C = V V^T / ||V||_F`` or one of the low-rank forms), Safe LoRA computes

    cos_l = cos(vec(C_l B_l A_l), vec(B_l A_l))

and projects the least aligned modules, ``B_l <- C_l B_l`` (``A_l`` unchanged): the ``num_proj_layers`` modules
with the lowest cosine (default 10), or every module with ``cos_l < threshold``. No data, no training.

The cosine never forms a ``d_out x d_in`` or ``d x d`` matrix. With ``G = A A^T`` (``r x r``) and ``CB = C B``:

    <C B A, B A>_F = sum((B^T CB) * G),   ||C B A||_F^2 = sum((CB^T CB) * G),   ||B A||_F^2 = sum((B^T B) * G).

The math (:func:`module_cosine`, :func:`select_modules`, :func:`project_adapter`) works on tensors and dicts;
:func:`safelora` does the file IO: it reads ``adapter_config.json`` + ``adapter_model.safetensors`` and writes a
*new* adapter directory atomically (built in a temporary directory beside the output, then renamed into place),
with ``safelora_report.json``. The input adapter directory is never written to.

Example::

    asft safelora --adapter runs/lora --direction llama2-chat.safetensors --output runs/lora-safelora
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning import regularizers as R
from asft_lightning.direction import DirectionSet, ModuleDirection, load_direction
from asft_lightning.errors import AsftError
from asft_lightning.fileio import atomic_replace_dir, sha256_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_NUM_PROJ_LAYERS",
    "REPORT_NAME",
    "SafeLoRAError",
    "lora_modules",
    "module_cosine",
    "project_adapter",
    "safelora",
    "select_modules",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_NAME = "safelora_report.json"
DEFAULT_NUM_PROJ_LAYERS = 10
#: Prefix PEFT puts before the base model's module names in a saved adapter.
PEFT_PREFIX = "base_model.model."
#: ``<module>.lora_A.weight`` or ``<module>.lora_A.<adapter name>.weight`` (some PEFT versions keep the name).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class SafeLoRAError(AsftError, ValueError):
    """An adapter or a setting that Safe LoRA cannot work with. The message names the file, module or tensor."""


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------


def module_cosine(lora_A: Tensor, lora_B: Tensor, md: ModuleDirection) -> Tensor:
    """``cos(vec(C B A), vec(B A))`` for one module, without forming ``B A`` or ``C``.

    Args:
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        md: the module's projector ``C`` (any form stored in a direction file).

    Returns:
        A scalar tensor in the dtype of ``lora_B``, clamped to ``[-1, 1]``. It is ``0`` when the update is
        non-zero but ``C B A = 0`` (fully off the aligned subspace), and ``nan`` when ``B A = 0`` (no update:
        the cosine is undefined and projecting would change nothing).
    """
    cb = md.apply(lora_B)
    gram_a = lora_A @ lora_A.mT
    inner = ((lora_B.mT @ cb) * gram_a).sum()
    proj_sq = R.frobenius_of_product(cb, lora_A).clamp_min(0)
    update_sq = R.frobenius_of_product(lora_B, lora_A).clamp_min(0)
    denom = proj_sq.sqrt() * update_sq.sqrt()
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    cos = torch.where(denom > 0, inner / safe_denom, torch.zeros_like(denom)).clamp(-1.0, 1.0)
    return torch.where(update_sq > 0, cos, torch.full_like(cos, math.nan))


def _check_selection(
    num_proj_layers: int | None, threshold: float | None
) -> tuple[str, int | None, float | None]:
    """Validate the selection settings; returns ``(mode, num_proj_layers, threshold)`` with the default filled in."""
    # The default num_proj_layers (10) may come along with a threshold (a CLI passes its default through); any
    # other value together with a threshold is a contradiction.
    if threshold is not None and num_proj_layers not in (None, DEFAULT_NUM_PROJ_LAYERS):
        raise SafeLoRAError(
            f"give num_proj_layers ({num_proj_layers}) or threshold ({threshold}), not both: "
            "num_proj_layers projects the k least aligned modules, threshold every module with cosine < threshold"
        )
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise SafeLoRAError(f"threshold must be a number in [-1, 1], got {threshold!r}")
        if not -1.0 <= float(threshold) <= 1.0:
            raise SafeLoRAError(
                f"threshold must be in [-1, 1] (it is compared with a cosine), got {threshold}"
            )
        return "threshold", None, float(threshold)
    k = DEFAULT_NUM_PROJ_LAYERS if num_proj_layers is None else num_proj_layers
    if isinstance(k, bool) or not isinstance(k, int):
        raise SafeLoRAError(f"num_proj_layers must be an integer >= 1, got {k!r}")
    if k < 1:
        raise SafeLoRAError(f"num_proj_layers must be >= 1, got {k}")
    return "num_proj_layers", k, None


def select_modules(
    cosines: dict[str, float], num_proj_layers: int | None = None, threshold: float | None = None
) -> list[str]:
    """Names of the modules Safe LoRA projects, in the order of ``cosines``.

    Args:
        cosines: module name -> cosine; ``nan`` (zero update) is never selected.
        num_proj_layers: project the ``num_proj_layers`` modules with the lowest cosine (ties: first in
            ``cosines``). ``None`` with no ``threshold`` means 10.
        threshold: project every module with ``cosine < threshold``; then ``num_proj_layers`` must be ``None``
            or its default, 10.
    """
    mode, k, t = _check_selection(num_proj_layers, threshold)
    valid = [name for name, c in cosines.items() if not math.isnan(c)]
    if mode == "threshold":
        chosen = {name for name in valid if cosines[name] < t}
    else:
        order = sorted(range(len(valid)), key=lambda i: (cosines[valid[i]], i))
        chosen = {valid[i] for i in order[:k]}
    return [name for name in cosines if name in chosen]


def lora_modules(state: dict[str, Any], source: str = "adapter") -> dict[str, tuple[str, str]]:
    """Find the LoRA pairs in an adapter state dict (or any mapping with its keys).

    Args:
        state: the adapter's tensors, keyed as PEFT saves them
            (``base_model.model.<module>.lora_A[.<adapter name>].weight``).
        source: what to call the state in error messages (e.g. the file path).

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
            raise SafeLoRAError(
                f"{source}: two lora_{m['which']} tensors for module {module}: '{slot[m['which']]}' and '{key}'"
            )
        slot[m["which"]] = key
    if not found:
        sample = sorted(state)[:5]
        raise SafeLoRAError(
            f"{source}: no LoRA tensors (keys like '<module>.lora_A.weight' / '.lora_B.weight'); "
            f"is this a LoRA adapter? First keys: {sample}"
        )
    if len(adapter_names) > 1:
        names = sorted(str(n) for n in adapter_names)
        raise SafeLoRAError(
            f"{source}: tensors of several adapters ({names}); save one adapter per directory"
        )
    out = {}
    for module in sorted(found, key=_natural_key):
        slot = found[module]
        for which in "AB":
            if which not in slot:
                other = slot["B" if which == "A" else "A"]
                raise SafeLoRAError(f"{source}: module {module} has '{other}' but no lora_{which} tensor")
        out[module] = (slot["A"], slot["B"])
    return out


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _module_shapes(
    state: dict[str, Tensor], pairs: dict[str, tuple[str, str]], source: str
) -> dict[str, tuple]:
    """``(d_out, d_in)`` per module from ``lora_B.shape[0]`` and ``lora_A.shape[1]``, checking the factors agree."""
    shapes = {}
    for module, (a_key, b_key) in pairs.items():
        a, b = state[a_key], state[b_key]
        if a.ndim != 2 or b.ndim != 2:
            raise SafeLoRAError(
                f"{source}: module {module}: LoRA factors must be matrices, got '{a_key}' {tuple(a.shape)} "
                f"and '{b_key}' {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise SafeLoRAError(
                f"{source}: module {module}: rank mismatch, '{a_key}' is {tuple(a.shape)} (r, d_in) but "
                f"'{b_key}' is {tuple(b.shape)} (d_out, r)"
            )
        if not a.is_floating_point() or not b.is_floating_point():
            raise SafeLoRAError(
                f"{source}: module {module}: LoRA factors must be floating point, got {a.dtype}"
            )
        for key, t in ((a_key, a), (b_key, b)):
            if not torch.isfinite(t).all():
                raise SafeLoRAError(f"{source}: tensor '{key}' has non-finite values")
        shapes[module] = (int(b.shape[0]), int(a.shape[1]))
    return shapes


def _check_direction(md: ModuleDirection, path: str) -> None:
    """Refuse a zero or non-finite direction: its projector is ``0 / 0`` and every cosine would be ``nan``."""
    norm = float(md.norm)
    if not math.isfinite(norm) or norm <= 0:
        raise SafeLoRAError(
            f"{path}: module {md.name} has ||V||_F = {norm}; the aligned and unaligned weights of this module are "
            "equal (or the file is damaged), so it has no alignment direction to project onto"
        )
    for part in ("direction", "basis", "weights"):
        t = getattr(md, part)
        if t is not None and not torch.isfinite(t).all():
            raise SafeLoRAError(f"{path}: tensor '{md.name}.{part}' has non-finite values")


def project_adapter(
    state: dict[str, Tensor],
    directions: DirectionSet,
    num_proj_layers: int | None = None,
    threshold: float | None = None,
    source: str = "adapter",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Safe LoRA on an adapter state dict: cosines, selection, ``B <- C B`` on the selected modules.

    Cosines and projections are computed in float64; a projected ``B`` is stored back in its own dtype. Tensors
    that are not LoRA factors are passed through unchanged, and the input ``state`` is not modified.

    Args:
        state: adapter tensors as PEFT saves them.
        directions: the direction file; it must cover exactly the adapter's LoRA modules with shapes
            ``(d_out, d_in)`` (checked with :meth:`DirectionSet.check_modules`).
        num_proj_layers: project the ``num_proj_layers`` least aligned modules (``None`` and no threshold: 10).
        threshold: project every module with cosine below it (``num_proj_layers`` must then be ``None`` or 10).
        source: what to call the adapter in error messages.

    Returns:
        ``(new_state, report)``; the report has ``settings`` and per-module ``cosine`` (``None`` for a zero
        update), ``projected``, ``shape``, ``rank``, ``update_norm`` and (projected modules) ``update_norm_after``.
    """
    mode, k, t = _check_selection(num_proj_layers, threshold)
    pairs = lora_modules(state, source)
    shapes = _module_shapes(state, pairs, source)
    directions.check_modules(shapes, source)

    cosines: dict[str, float] = {}
    norms: dict[str, float] = {}
    for module, (a_key, b_key) in pairs.items():
        a, b = state[a_key].double(), state[b_key].double()
        md = directions.modules[module].to("cpu", torch.float64)
        _check_direction(md, directions.path)
        cosines[module] = float(module_cosine(a, b, md))
        norms[module] = float(R.update_energy(a, b).clamp_min(0).sqrt())
    chosen = set(select_modules(cosines, k, t))

    new_state = dict(state)
    modules: dict[str, Any] = {}
    for module, (a_key, b_key) in pairs.items():
        cos = cosines[module]
        entry: dict[str, Any] = {
            "cosine": None if math.isnan(cos) else cos,
            "projected": module in chosen,
            "shape": list(shapes[module]),
            "rank": int(state[a_key].shape[0]),
            "update_norm": norms[module],
            "lora_A": a_key,
            "lora_B": b_key,
        }
        if module in chosen:
            b = state[b_key]
            md = directions.modules[module].to("cpu", torch.float64)
            projected = md.apply(b.double())
            new_state[b_key] = projected.to(b.dtype).contiguous()
            entry["update_norm_after"] = float(
                R.update_energy(state[a_key].double(), projected).clamp_min(0).sqrt()
            )
        modules[module] = entry
    report = {
        "settings": {"mode": mode, "num_proj_layers": k, "threshold": t},
        "projector": directions.metadata.get("projector", {}),
        "num_modules": len(modules),
        "num_projected": len(chosen),
        "num_zero_updates": sum(1 for m in modules.values() if m["cosine"] is None),
        "modules": modules,
    }
    return new_state, report


# --------------------------------------------------------------------------------------------------------------
# IO
# --------------------------------------------------------------------------------------------------------------


def _read_adapter(adapter: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """``(adapter_config, tensors, safetensors header metadata)`` of a PEFT LoRA adapter directory."""
    if not adapter.exists():
        raise SafeLoRAError(f"{adapter}: adapter directory not found")
    if not adapter.is_dir():
        raise SafeLoRAError(
            f"{adapter}: not a directory; give the PEFT adapter directory (save_pretrained output)"
        )
    cfg_path = adapter / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise SafeLoRAError(
            f"{cfg_path}: missing; expected a PEFT adapter directory (save_pretrained output)"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SafeLoRAError(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise SafeLoRAError(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise SafeLoRAError(
            f"{cfg_path}: peft_type is {config.get('peft_type')!r}; Safe LoRA projects LoRA adapters only"
        )
    if config.get("use_dora"):
        raise SafeLoRAError(
            f"{cfg_path}: a DoRA adapter (use_dora: true); Safe LoRA's B <- C B is defined for plain LoRA only"
        )
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (adapter / "adapter_model.bin").is_file()
            else ""
        )
        raise SafeLoRAError(f"{weights}: missing{hint}")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            header = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise SafeLoRAError(f"{weights}: corrupt or unreadable safetensors file ({err})") from err
    return config, tensors, header


def _check_output(adapter: Path, output: Path, direction: Path, overwrite: bool) -> None:
    a, o = adapter.resolve(), output.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise SafeLoRAError(
            f"{output}: the output must not be the input adapter directory {adapter}, inside it, or contain it"
        )
    if o == direction.resolve() or o in direction.resolve().parents:
        raise SafeLoRAError(f"{output}: the output would replace the direction file {direction}")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise SafeLoRAError(f"{output}: exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise SafeLoRAError(f"{output}: exists and is not empty; pass overwrite=True to replace it")


def safelora(
    adapter: str,
    direction: str,
    output: str,
    num_proj_layers: int | None = DEFAULT_NUM_PROJ_LAYERS,
    threshold: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Safe LoRA (arXiv 2405.16833): project the least aligned LoRA modules of an adapter onto the alignment direction.

    For every LoRA module the cosine between ``C B A`` and ``B A`` is computed (``C`` from the direction file);
    the selected modules get ``B <- C B``. A new PEFT adapter directory is written (the input is never
    modified), with ``safelora_report.json`` listing every module's cosine and whether it was projected.

    Args:
        adapter: PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        direction: direction file from ``asft direction`` (``.safetensors``), made for the adapter's base model
            and covering exactly the adapter's LoRA modules.
        output: directory for the projected adapter; written atomically, must not exist or be empty unless
            ``overwrite`` is set.
        num_proj_layers: project this many modules, those with the lowest cosine (the paper's default: 10).
        threshold: instead of ``num_proj_layers``, project every module whose cosine is below this value, in
            [-1, 1] (the paper uses 0.5). Only the default ``num_proj_layers`` (or ``None``) may come with it.
        overwrite: replace a non-empty ``output`` directory.

    Returns:
        The report written to ``<output>/safelora_report.json``.
    """
    adapter_dir, output_dir, direction_path = Path(adapter), Path(output), Path(direction)
    _check_selection(num_proj_layers, threshold)
    config, state, header = _read_adapter(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    _check_output(adapter_dir, output_dir, direction_path, overwrite)
    directions = load_direction(direction_path)
    new_state, report = project_adapter(
        state, directions, num_proj_layers, threshold, source=str(weights_path)
    )
    report = {
        "method": "safelora (arXiv 2405.16833)",
        "adapter": str(adapter_dir.resolve()),
        "adapter_sha256": sha256_file(weights_path),
        "direction": str(direction_path.resolve()),
        "direction_sha256": sha256_file(direction_path),
        "output": str(output_dir.resolve()),
        **report,
    }

    def build(tmp: Path) -> None:
        copied = []
        for src in sorted(adapter_dir.iterdir()):
            if src.is_file() and not src.name.startswith("adapter_model.") and src.name != REPORT_NAME:
                shutil.copy2(src, tmp / src.name)
                copied.append(src.name)
        report["copied_files"] = copied
        meta = {**header, "format": header.get("format", "pt")}
        meta["asft_safelora"] = json.dumps(
            {
                "direction": report["direction"],
                "settings": report["settings"],
                "num_projected": report["num_projected"],
            }
        )
        save_file(
            {k: v.contiguous() for k, v in new_state.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=meta
        )
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, output_dir)
    return report
