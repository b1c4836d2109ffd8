"""SafeMERGE (Djuhera et al., arXiv 2503.17239): where Safe LoRA's cosine test flags a module, merge it with a safety
adapter instead of projecting it.

Per LoRA module ``l`` of the fine-tuned adapter, with ``C_l`` from a direction file, SafeMERGE computes Safe LoRA's
``cos_l = cos(vec(C_l B_l A_l), vec(B_l A_l))`` and flags the module when ``cos_l < threshold`` (the authors'
code: the cosine rounded to 5 decimals, strictly below; a module without an update has cosine 0). A flagged
module's update becomes a weighted sum of the fine-tuned update and the same module's update in a *safety adapter*
(a LoRA of the same base model trained on safety data: harmful prompts with refusals); the other modules keep the
fine-tuned update:

    flagged:      dW_l = w_f s_f B_f A_f + w_s s_s B_s A_s        (defaults w_f = 0.8, w_s = 0.2)
    not flagged:  dW_l = s_f B_f A_f

``combination`` picks how the sum is written as LoRA factors:

* ``updates`` (default): exactly the formula above, ``A' = [A_f; A_s]``, ``B' = [w_f s_f B_f, w_s s_s B_s]``
  (rank ``r_f + r_s``; modules not flagged are zero-padded to it);
* ``factors``: what the authors' released code computes through PEFT's ``linear`` weighted-adapter merge, which
  sums the factors, ``A' = c_f A_f + c_s A_s`` and ``B' = c_f B_f + c_s B_s`` with ``c = sqrt(w s)``. Its product
  is the formula plus the cross terms ``c_f c_s (B_f A_s + B_s A_f)``; it needs equal ranks. Offered to
  reproduce their numbers.

Either way the scaling is folded into ``B`` (``lora_alpha = r``, as PEFT's own merge writes it). The math
(:func:`flag_modules`, :func:`merge_factors`) is pure; :func:`safemerge` reads, checks every input before any work,
and writes a new adapter directory atomically with ``safemerge_report.json``; the inputs are only read.

Example::

    asft safemerge --adapter runs/sft/adapter --safety_adapter runs/safety/adapter --direction v.safetensors \\
        --output runs/sft-safemerge
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning import regularizers as R
from asft_lightning.adapter_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    check_output,
    copy_side_files,
    merged_config,
    read_adapter,
)
from asft_lightning.direction import load_direction
from asft_lightning.errors import ArgumentError, AsftError
from asft_lightning.fileio import atomic_replace_dir, sha256_file
from asft_lightning.resta import pad_rank
from asft_lightning.safelora import adapter_cosines, selection_cosine

__all__ = ["DEFAULT_THRESHOLD", "REPORT_NAME", "SafeMergeError", "flag_modules", "merge_factors", "safemerge"]

REPORT_NAME = "safemerge_report.json"
#: The threshold and weights of the authors' published example (``--cos_threshold 0.35 --weighting [0.8, 0.2]``).
DEFAULT_THRESHOLD = 0.35
Selection = Literal["published", "strict"]
Combination = Literal["updates", "factors"]


class SafeMergeError(AsftError, ValueError):
    """Adapters or settings SafeMERGE cannot work with. The message names the file, module or flag."""


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------


def flag_modules(
    cosines: dict[str, float], threshold: float, selection: Selection = "published"
) -> list[str]:
    """Names of the modules SafeMERGE merges, in the order of ``cosines``.

    ``published`` (the authors' code): ``numpy.round(cos, 5) < threshold``, a module without an update (``nan``)
    counting as cosine 0. ``strict``: ``cos < threshold`` unrounded, a module without an update never flagged.
    (Safe LoRA's published rule is ``<=``; SafeMERGE's is ``<``.)
    """
    flagged = []
    for name, cos in cosines.items():
        used = selection_cosine(cos, selection)
        if not math.isnan(used) and used < threshold:
            flagged.append(name)
    return flagged


def merge_factors(
    finetuned: tuple[Tensor, Tensor, float],
    safety: tuple[Tensor, Tensor, float],
    weights: tuple[float, float],
    combination: Combination = "updates",
) -> tuple[Tensor, Tensor]:
    """LoRA factors (scaling 1) of a flagged module's merged update.

    Args:
        finetuned: ``(A_f, B_f, s_f)``.
        safety: ``(A_s, B_s, s_s)``.
        weights: ``(w_f, w_s)``.
        combination: ``updates``: ``[A_f; A_s]``, ``[w_f s_f B_f, w_s s_s B_s]`` (product
            ``w_f s_f B_f A_f + w_s s_s B_s A_s``); ``factors``: PEFT's linear merge, ``sum_i sign_i c_i A_i`` and
            ``sum_i c_i B_i`` with ``c_i = sqrt(|w_i s_i|)`` and ``sign_i`` the sign of ``w_i s_i``.
    """
    (a_f, b_f, s_f), (a_s, b_s, s_s) = finetuned, safety
    w_f, w_s = weights
    if combination == "updates":
        return torch.cat([a_f, a_s], 0), torch.cat([w_f * s_f * b_f, w_s * s_s * b_s], 1)
    if a_f.shape != a_s.shape or b_f.shape != b_s.shape:
        raise SafeMergeError(
            f"combination 'factors' sums the LoRA factors, so both adapters need the same rank: "
            f"{tuple(a_f.shape)} vs {tuple(a_s.shape)}; use combination 'updates'"
        )
    c_f, c_s = math.sqrt(abs(w_f * s_f)), math.sqrt(abs(w_s * s_s))
    sign_f, sign_s = math.copysign(1.0, w_f * s_f), math.copysign(1.0, w_s * s_s)
    return sign_f * c_f * a_f + sign_s * c_s * a_s, c_f * b_f + c_s * b_s


def _unmerged(
    lora_A: Tensor, lora_B: Tensor, scaling: float, combination: Combination
) -> tuple[Tensor, Tensor]:
    """A module that is not flagged keeps ``s B A`` (``factors``: PEFT's merge with weights ``[1, 0]``)."""
    if combination == "updates":
        return lora_A, scaling * lora_B
    c = math.sqrt(abs(scaling))
    return math.copysign(1.0, scaling) * c * lora_A, c * lora_B


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def _check_arguments(
    threshold: float, finetuned_weight: float, safety_weight: float, selection: str, combination: str
) -> None:
    for flag, value in (
        ("threshold", threshold),
        ("finetuned_weight", finetuned_weight),
        ("safety_weight", safety_weight),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ArgumentError(f"{flag} must be a finite number, got {value!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ArgumentError(f"threshold must be in [-1, 1] (it is compared with a cosine), got {threshold}")
    if selection not in ("published", "strict"):
        raise ArgumentError(
            f"selection must be 'published' (rounded to 5 decimals, < threshold, zero update = cosine 0) or "
            f"'strict' (unrounded, zero updates never merged), got {selection!r}"
        )
    if combination not in ("updates", "factors"):
        raise ArgumentError(f"combination must be 'updates' or 'factors', got {combination!r}")


def _check_pair(lora: LoraAdapter, safety: LoraAdapter, combination: str) -> None:
    """The safety adapter has the fine-tuned adapter's modules and shapes (and ranks, for ``factors``)."""
    missing = sorted(set(lora.shapes) - set(safety.shapes))
    extra = sorted(set(safety.shapes) - set(lora.shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no update for {len(missing)} module(s) of {lora.weights_path}, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} module(s) the fine-tuned adapter does not have, e.g. {extra[:3]}")
        raise SafeMergeError(
            f"safety_adapter {safety.weights_path}: made for another set of modules: " + "; ".join(parts)
        )
    for name, shape in lora.shapes.items():
        if safety.shapes[name] != shape:
            raise SafeMergeError(
                f"safety_adapter {safety.weights_path}: module {name} is {safety.shapes[name]} (d_out, d_in) but "
                f"{shape} in {lora.weights_path}; were they made for different base models?"
            )
        if combination == "factors" and safety.rank(name) != lora.rank(name):
            raise SafeMergeError(
                f"safety_adapter {safety.weights_path}: module {name} has rank {safety.rank(name)} but "
                f"{lora.rank(name)} in {lora.weights_path}; combination 'factors' sums the factors and needs equal "
                "ranks (use combination 'updates')"
            )
    for which in (lora, safety):
        if which.config.get("fan_in_fan_out"):
            raise SafeMergeError(
                f"{which.path / ADAPTER_CONFIG}: fan_in_fan_out: true (Conv1D weights); SafeMERGE supports "
                "nn.Linear adapters only"
            )


def safemerge(
    adapter: str,
    safety_adapter: str,
    direction: str,
    output: str,
    threshold: float = DEFAULT_THRESHOLD,
    finetuned_weight: float = 0.8,
    safety_weight: float = 0.2,
    selection: Selection = "published",
    combination: Combination = "updates",
    overwrite: bool = False,
) -> dict:
    """SafeMERGE (arXiv 2503.17239): merge the modules Safe LoRA's cosine test flags with a safety adapter.

    Modules whose cosine ``cos(C B A, B A)`` is below ``threshold`` get the update
    ``finetuned_weight * s_f B_f A_f + safety_weight * s_s B_s A_s``; the others keep the fine-tuned update. Writes a
    new PEFT adapter directory atomically, with ``safemerge_report.json``; the inputs are only read.

    Args:
        adapter: the fine-tuned PEFT LoRA adapter directory.
        safety_adapter: a LoRA adapter of the same base model and modules trained on safety data (e.g. harmful
            prompts with refusals: ``asft fit --model.lam 0`` on such pairs).
        direction: direction file from ``asft direction`` covering exactly the adapter's modules (any projector).
        output: directory to write (must not exist or be empty unless ``overwrite``).
        threshold: merge modules whose cosine is below this, in [-1, 1] (the authors' example: 0.35).
        finetuned_weight: weight of the fine-tuned update in a merged module (the authors: 0.8).
        safety_weight: weight of the safety update in a merged module (the authors: 0.2).
        selection: ``published`` (the authors' code: cosine rounded to 5 decimals, ``<``, a zero update has cosine
            0) or ``strict`` (unrounded, zero updates never merged).
        combination: ``updates`` (exact weighted sum of the two updates, rank r_f + r_s) or ``factors`` (the
            released code's PEFT linear merge of A and B, which adds cross terms; equal ranks).
        overwrite: replace a non-empty ``output`` directory.

    Returns:
        The report written to ``<output>/safemerge_report.json``.
    """
    _check_arguments(threshold, finetuned_weight, safety_weight, selection, combination)
    threshold, weights = float(threshold), (float(finetuned_weight), float(safety_weight))
    lora = read_adapter(adapter, SafeMergeError, "SafeMERGE", flag="adapter")
    safety = read_adapter(safety_adapter, SafeMergeError, "SafeMERGE", flag="safety_adapter")
    _check_pair(lora, safety, combination)
    direction_path, output_dir = Path(direction), Path(output)
    directions = load_direction(direction_path)
    directions.check_modules(lora.shapes, str(lora.weights_path))
    check_output(
        output_dir,
        {
            "adapter directory": lora.path,
            "safety_adapter directory": safety.path,
            "direction file": direction_path,
        },
        overwrite,
        SafeMergeError,
    )

    cosines, norms = adapter_cosines(lora.tensors, lora.pairs, directions)
    flagged = set(flag_modules(cosines, threshold, selection))
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name in lora.pairs:
        a_f, b_f = lora.factors(name)
        s_f = lora.scaling(name)
        a_s, b_s = safety.factors(name)
        s_s = safety.scaling(name)
        if name in flagged:
            a2, b2 = merge_factors((a_f, b_f, s_f), (a_s, b_s, s_s), weights, combination)
        else:
            a2, b2 = _unmerged(a_f, b_f, s_f, combination)
        factors[name] = (a2, b2)
        cos, used = cosines[name], selection_cosine(cosines[name], selection)
        entries[name] = {
            "cosine": None if math.isnan(cos) else cos,
            "selection_cosine": None if math.isnan(used) else used,
            "merged": name in flagged,
            "shape": list(lora.shapes[name]),
            "rank": lora.rank(name),
            "safety_rank": safety.rank(name),
            "update_norm": s_f * norms[name],
            "safety_update_norm": s_s * float(R.update_energy(a_s, b_s).clamp_min(0).sqrt()),
            "update_norm_after": float(R.update_energy(a2, b2).clamp_min(0).sqrt()),
        }
    rank = max(a.shape[0] for a, _ in factors.values())
    new_state = dict(lora.tensors)
    for name, (a2, b2) in factors.items():
        a_key, b_key = lora.pairs[name]
        a2, b2 = pad_rank(a2, b2, rank)
        new_state[a_key] = a2.to(lora.tensors[a_key].dtype).contiguous()
        new_state[b_key] = b2.to(lora.tensors[b_key].dtype).contiguous()
    config = merged_config(lora.config, rank)
    settings = {
        "threshold": threshold,
        "finetuned_weight": weights[0],
        "safety_weight": weights[1],
        "selection": selection,
        "combination": combination,
    }
    report: dict[str, Any] = {
        "method": "safemerge (arXiv 2503.17239)",
        "settings": settings,
        "adapter": str(lora.path.resolve()),
        "adapter_sha256": sha256_file(lora.weights_path),
        "safety_adapter": str(safety.path.resolve()),
        "safety_adapter_sha256": sha256_file(safety.weights_path),
        "direction": str(direction_path.resolve()),
        "direction_sha256": sha256_file(direction_path),
        "projector": directions.metadata.get("projector", {}),
        "output": str(output_dir.resolve()),
        "rank": rank,
        "num_modules": len(entries),
        "num_merged": len(flagged),
        "num_zero_updates": sum(1 for e in entries.values() if e["cosine"] is None),
        "modules": entries,
    }

    def build(tmp: Path) -> None:
        report["copied_files"] = copy_side_files(lora.path, tmp, skip={ADAPTER_CONFIG})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        meta = {**lora.header, "format": lora.header.get("format", "pt")}
        meta["asft_safemerge"] = json.dumps({"direction": report["direction"], "settings": settings})
        save_file(new_state, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, output_dir)
    print(
        json.dumps({"output": str(output_dir), "modules": len(entries), "merged": len(flagged), "rank": rank})
    )
    return report
