"""Safe LoRA (Hsu et al., arXiv 2405.16833) as a post-hoc projection of an existing PEFT LoRA adapter.

Per LoRA module ``l`` with the projector ``C_l`` of a direction file (:mod:`asft_lightning.direction`; the
published ``C = V V^T / ||V||_F`` or one of the low-rank forms), Safe LoRA computes

    cos_l = cos(vec(C_l B_l A_l), vec(B_l A_l))

and projects the least aligned modules, ``B_l <- C_l B_l`` (``A_l`` unchanged): the ``num_proj_layers`` modules
with the lowest cosine (default 10), or every module at or below ``threshold``. No data, no training.

Which modules count as "lowest" is decided by ``selection`` (:func:`select_modules`):

* ``published`` (default), exactly as the authors' code decides: each cosine is rounded to 5 decimals
  (``numpy.round``), a module with no update (``B A = 0``) gets cosine 0, a module is projected when its rounded
  cosine is ``<=`` the threshold, and in number mode the threshold is the ``num_proj_layers``-th smallest rounded
  cosine, so every module tied with it is projected too (possibly more than ``num_proj_layers``);
* ``strict``: the unrounded cosine, strictly ``<`` the threshold, exactly ``num_proj_layers`` modules in number
  mode (ties broken by module order), and a module without an update is never selected.

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
from pathlib import Path
from typing import Any, Literal

import numpy
import torch
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning import regularizers as R
from asft_lightning.adapter_io import (  # noqa: F401 (ADAPTER_CONFIG, PEFT_PREFIX: re-exported, their old home)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    AdapterError,
    check_output,
    copy_side_files,
    module_shapes,
    read_adapter,
)
from asft_lightning.adapter_io import lora_modules as _lora_modules
from asft_lightning.adapter_io import natural_key as _natural_key  # noqa: F401 (its old home)
from asft_lightning.direction import DirectionSet, ModuleDirection, load_direction
from asft_lightning.fileio import atomic_replace_dir, sha256_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_NUM_PROJ_LAYERS",
    "PEFT_PREFIX",
    "REPORT_NAME",
    "SELECTIONS",
    "SafeLoRAError",
    "lora_modules",
    "module_cosine",
    "project_adapter",
    "safelora",
    "select_modules",
    "selection_cosine",
]

REPORT_NAME = "safelora_report.json"
DEFAULT_NUM_PROJ_LAYERS = 10
#: Decimals the published code rounds each cosine to before comparing it.
PUBLISHED_DECIMALS = 5
Selection = Literal["published", "strict"]
SELECTIONS = ("published", "strict")


class SafeLoRAError(AdapterError):
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
    num_proj_layers: int | None, threshold: float | None, selection: str = "published"
) -> tuple[str, int | None, float | None]:
    """Validate the selection settings; returns ``(mode, num_proj_layers, threshold)`` with the default filled in."""
    if selection not in SELECTIONS:
        raise SafeLoRAError(
            f"selection must be 'published' (the authors' rule: cosines rounded to 5 decimals, <= threshold, ties "
            f"at the k-th value all projected) or 'strict' (< threshold, exactly k), got {selection!r}"
        )
    # The default num_proj_layers (10) may come along with a threshold (a CLI passes its default through); any
    # other value together with a threshold is a contradiction.
    if threshold is not None and num_proj_layers not in (None, DEFAULT_NUM_PROJ_LAYERS):
        raise SafeLoRAError(
            f"give num_proj_layers ({num_proj_layers}) or threshold ({threshold}), not both: "
            "num_proj_layers projects the k least aligned modules, threshold every module whose cosine is at or "
            "below it"
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


def selection_cosine(cosine: float, selection: Selection = "published") -> float:
    """The number the selection compares for a module with this cosine.

    ``published``: ``numpy.round(cosine, 5)``, and 0 for ``nan`` (no update; the published code's
    ``cosine_similarity`` of a zero vector). ``strict``: the cosine itself (``nan`` stays ``nan``: never selected).
    """
    if selection == "strict":
        return float(cosine)
    if math.isnan(cosine):
        return 0.0
    return float(numpy.round(float(cosine), PUBLISHED_DECIMALS))


def select_modules(
    cosines: dict[str, float],
    num_proj_layers: int | None = None,
    threshold: float | None = None,
    selection: Selection = "published",
) -> list[str]:
    """Names of the modules Safe LoRA projects, in the order of ``cosines``.

    Args:
        cosines: module name -> cosine (``nan``: no update).
        num_proj_layers: project the modules with the ``num_proj_layers`` lowest cosines. ``None`` with no
            ``threshold`` means 10. ``published``: the threshold becomes the ``num_proj_layers``-th smallest
            rounded cosine, so modules tied with it are all projected; ``strict``: exactly ``num_proj_layers``
            modules, ties broken by the order of ``cosines``.
        threshold: project every module whose cosine is ``<=`` it (``published``, after rounding) or ``<`` it
            (``strict``); then ``num_proj_layers`` must be ``None`` or its default, 10.
        selection: ``published`` (the authors' rule, see :func:`selection_cosine`) or ``strict``.
    """
    mode, k, t = _check_selection(num_proj_layers, threshold, selection)
    if selection == "published":
        used = {name: selection_cosine(c, "published") for name, c in cosines.items()}
        if mode == "num_proj_layers":
            if not used:
                return []
            t = sorted(used.values())[:k][-1]
        chosen = {name for name, c in used.items() if c <= t}
        return [name for name in cosines if name in chosen]
    valid = [name for name, c in cosines.items() if not math.isnan(c)]
    if mode == "threshold":
        chosen = {name for name in valid if cosines[name] < t}
    else:
        order = sorted(range(len(valid)), key=lambda i: (cosines[valid[i]], i))
        chosen = {valid[i] for i in order[:k]}
    return [name for name in cosines if name in chosen]


def lora_modules(state: dict[str, Any], source: str = "adapter") -> dict[str, tuple[str, str]]:
    """Find the LoRA pairs in an adapter state dict (see :func:`asft_lightning.adapter_io.lora_modules`).

    Returns:
        Base-model module name (``base_model.model.`` stripped) -> ``(lora_A key, lora_B key)``, in natural order.
    """
    return _lora_modules(state, source, SafeLoRAError)


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


def adapter_cosines(
    state: dict[str, Tensor],
    pairs: dict[str, tuple[str, str]],
    directions: DirectionSet,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per module ``cos(vec(C B A), vec(B A))`` (``nan`` for no update) and ``||B A||_F``, in float64.

    Args:
        state: adapter tensors.
        pairs: module -> ``(lora_A key, lora_B key)`` (from :func:`lora_modules`); every module must be in
            ``directions`` (check with :meth:`DirectionSet.check_modules` first).
        directions: the direction file; a zero or non-finite direction is refused.
    """
    cosines: dict[str, float] = {}
    norms: dict[str, float] = {}
    for module, (a_key, b_key) in pairs.items():
        a, b = state[a_key].double(), state[b_key].double()
        md = directions.modules[module].to("cpu", torch.float64)
        _check_direction(md, directions.path)
        cosines[module] = float(module_cosine(a, b, md))
        norms[module] = float(R.update_energy(a, b).clamp_min(0).sqrt())
    return cosines, norms


def project_adapter(
    state: dict[str, Tensor],
    directions: DirectionSet,
    num_proj_layers: int | None = None,
    threshold: float | None = None,
    source: str = "adapter",
    selection: Selection = "published",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Safe LoRA on an adapter state dict: cosines, selection, ``B <- C B`` on the selected modules.

    Cosines and projections are computed in float64; a projected ``B`` is stored back in its own dtype. Tensors
    that are not LoRA factors are passed through unchanged, and the input ``state`` is not modified.

    Args:
        state: adapter tensors as PEFT saves them.
        directions: the direction file; it must cover exactly the adapter's LoRA modules with shapes
            ``(d_out, d_in)`` (checked with :meth:`DirectionSet.check_modules`).
        num_proj_layers: project the ``num_proj_layers`` least aligned modules (``None`` and no threshold: 10).
        threshold: project every module whose cosine is at or below it (``published``) or below it (``strict``);
            ``num_proj_layers`` must then be ``None`` or 10.
        source: what to call the adapter in error messages.
        selection: ``published`` (the authors' rule) or ``strict``; see :func:`select_modules`.

    Returns:
        ``(new_state, report)``; the report has ``settings``, ``selection_threshold`` (the threshold the rule
        compared with; in number mode the k-th smallest cosine) and per module ``cosine`` (``None`` for a zero
        update), ``selection_cosine`` (the number compared: rounded under ``published``), ``projected``,
        ``shape``, ``rank``, ``update_norm`` and (projected modules) ``update_norm_after``.
    """
    mode, k, t = _check_selection(num_proj_layers, threshold, selection)
    pairs = lora_modules(state, source)
    shapes = module_shapes(state, pairs, source, SafeLoRAError)
    directions.check_modules(shapes, source)

    cosines, norms = adapter_cosines(state, pairs, directions)
    chosen = set(select_modules(cosines, k, t, selection))
    used = {m: selection_cosine(c, selection) for m, c in cosines.items()}
    if mode == "threshold":
        threshold_used = t
    else:
        ranked = sorted(c for c in used.values() if not math.isnan(c))
        threshold_used = ranked[:k][-1] if ranked else None

    new_state = dict(state)
    modules: dict[str, Any] = {}
    for module, (a_key, b_key) in pairs.items():
        cos = cosines[module]
        entry: dict[str, Any] = {
            "cosine": None if math.isnan(cos) else cos,
            "selection_cosine": None if math.isnan(used[module]) else used[module],
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
        "settings": {"mode": mode, "num_proj_layers": k, "threshold": t, "selection": selection},
        "selection_threshold": threshold_used,
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


def safelora(
    adapter: str,
    direction: str,
    output: str,
    num_proj_layers: int | None = DEFAULT_NUM_PROJ_LAYERS,
    threshold: float | None = None,
    overwrite: bool = False,
    selection: Selection = "published",
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
        num_proj_layers: project this many modules, those with the lowest cosine (the paper's default: 10); under
            ``published`` selection every module tied with the last one is projected too.
        threshold: instead of ``num_proj_layers``, project every module whose cosine is at or below this value
            (``published``, after rounding to 5 decimals) or below it (``strict``), in [-1, 1] (the paper uses
            0.5). Only the default ``num_proj_layers`` (or ``None``) may come with it.
        overwrite: replace a non-empty ``output`` directory.
        selection: ``published`` (default; the authors' code: cosines rounded to 5 decimals, ``<=``, ties at the
            k-th value all projected, a zero update has cosine 0) or ``strict`` (``<``, exactly k, zero updates
            never selected).

    Returns:
        The report written to ``<output>/safelora_report.json``.
    """
    adapter_dir, output_dir, direction_path = Path(adapter), Path(output), Path(direction)
    _check_selection(num_proj_layers, threshold, selection)
    lora = read_adapter(adapter_dir, SafeLoRAError, "Safe LoRA")
    state, header = lora.tensors, lora.header
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    check_output(
        output_dir,
        {"adapter directory": adapter_dir, "direction file": direction_path},
        overwrite,
        SafeLoRAError,
        SafeLoRAError,
    )
    directions = load_direction(direction_path)
    new_state, report = project_adapter(
        state, directions, num_proj_layers, threshold, source=str(weights_path), selection=selection
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
        report["copied_files"] = copy_side_files(adapter_dir, tmp, skip={REPORT_NAME})
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
