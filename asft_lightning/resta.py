"""RESTA-style safety re-alignment (Bhardwaj et al., arXiv 2402.11746): add ``gamma * V`` back to a fine-tune.

RESTA ("REstoring Safety through Task Arithmetic") adds the safety vector to the weights of the fine-tuned
model. Here the safety vector is the alignment direction of a direction file (:mod:`asft_lightning.direction`),
``V_l = W_l(aligned) - W_l(reference)`` per module (RESTA's own vector is ``--reference harmful``: the aligned
model minus a harmful fine-tune of it). Per module ``l`` chosen by ``modules`` (default: all of the file's):

    fine-tuned weight  W_l + s B_l A_l   ->   W_l + s B_l A_l + gamma V_l         (an adapter on base W)
    fine-tuned weight  W_l               ->   W_l + gamma V_l                     (a full fine-tune)

``s B A + gamma V`` is no longer low rank, so an adapter can be written two ways (``output_format``):

* ``model``: the merged full model directory, ``W + s B A + gamma V``: exactly RESTA, which merges and adds;
* ``adapter``: a PEFT adapter whose module ``l`` carries the same sum as LoRA factors of a larger rank,
  ``A' = [A; A_V]`` and ``B' = [s B, gamma B_V]`` with ``V ~ B_V A_V``. With ``v_rank`` unset the factorisation
  is exact (``B_V = I, A_V = V`` or ``B_V = V, A_V = I``, rank ``min(d_out, d_in)``); with ``v_rank = k`` it is
  ``V``'s top-``k`` SVD and the report gives the dropped part ``gamma ||V - V_k||_F`` per module. The scaling is
  folded into ``B`` (``lora_alpha = r``), and every module is zero-padded to one rank so PEFT and vLLM load it.

The math (:func:`resta_update`, :func:`direction_factors`, :func:`resta_factors`) is pure tensor code; :func:`resta`
reads the inputs, checks all of them before any work, and writes the output directory atomically
(:func:`asft_lightning.fileio.atomic_replace_dir`): a killed run leaves no output, the inputs are only read.

Example::

    asft resta --model runs/aligned --adapter runs/sft/adapter --direction v.safetensors --output runs/sft-resta
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning.adapter_io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    check_output,
    copy_side_files,
    merged_config,
    read_adapter,
)
from asft_lightning.checkpoints import CheckpointError, CheckpointReader, architecture_fingerprint
from asft_lightning.direction import DirectionError, DirectionSet, load_direction, module_matches
from asft_lightning.errors import ArgumentError, AsftError
from asft_lightning.fileio import atomic_replace_dir, sha256_file
from asft_lightning.model_edit import write_edited_model

__all__ = [
    "REPORT_NAME",
    "RestaError",
    "direction_factors",
    "pad_rank",
    "resta",
    "resta_factors",
    "resta_update",
    "select_direction_modules",
]

REPORT_NAME = "resta_report.json"
OutputFormat = Literal["model", "adapter"]


class RestaError(AsftError, ValueError):
    """Inputs RESTA cannot work with (an adapter, a direction or a model). The message names the file or flag."""


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------


def resta_update(
    direction: Tensor,
    gamma: float,
    lora_A: Tensor | None = None,
    lora_B: Tensor | None = None,
    scaling: float = 1.0,
) -> Tensor:
    """The dense change of one module's weight: ``s B A + gamma V`` (``gamma V`` without an adapter).

    Args:
        direction: ``V`` (``d_out x d_in``).
        gamma: multiple of ``V`` added.
        lora_A: ``(r, d_in)`` or ``None``.
        lora_B: ``(d_out, r)`` or ``None``.
        scaling: the LoRA scaling ``s``.
    """
    delta = gamma * direction
    if lora_A is not None and lora_B is not None:
        delta = delta + scaling * (lora_B @ lora_A)
    return delta


def direction_factors(direction: Tensor, v_rank: int | None = None) -> tuple[Tensor, Tensor, float]:
    """``(B_V, A_V, dropped)`` with ``B_V @ A_V = V`` (exact) or ``V``'s best rank-``v_rank`` approximation.

    Exact (``v_rank`` ``None`` or ``>= min(d_out, d_in)``): ``B_V = I, A_V = V`` when ``d_out <= d_in``, else
    ``B_V = V, A_V = I``; rank ``min(d_out, d_in)``, no SVD, no rounding beyond the copy. Truncated: ``V = U S W^T``,
    ``B_V = U_k S_k``, ``A_V = W_k^T``; ``dropped = ||V - B_V A_V||_F = sqrt(sum_{i > k} s_i^2)``.
    """
    d_out, d_in = direction.shape
    full = min(d_out, d_in)
    if v_rank is None or v_rank >= full:
        if d_out <= d_in:
            return torch.eye(d_out, dtype=direction.dtype, device=direction.device), direction.clone(), 0.0
        return direction.clone(), torch.eye(d_in, dtype=direction.dtype, device=direction.device), 0.0
    u, s, vh = torch.linalg.svd(direction, full_matrices=False)
    dropped = float(torch.linalg.vector_norm(s[v_rank:]))
    return u[:, :v_rank] * s[:v_rank], vh[:v_rank].clone(), dropped


def resta_factors(
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    direction: Tensor | None,
    gamma: float,
    v_rank: int | None = None,
) -> tuple[Tensor, Tensor, float]:
    """LoRA factors with scaling 1 whose product is ``s B A + gamma V`` (``V`` factored by :func:`direction_factors`).

    Args:
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        scaling: the adapter's ``s`` for this module; folded into ``B``.
        direction: ``V``, or ``None`` for a module that gets no ``gamma V`` (returns ``A, s B``).
        gamma: multiple of ``V``.
        v_rank: rank of ``V``'s factorisation (``None``: exact).

    Returns:
        ``(A', B', dropped)``: ``A' = [A; A_V]`` (``(r + k, d_in)``), ``B' = [s B, gamma B_V]``
        (``(d_out, r + k)``), and ``|gamma| ||V - B_V A_V||_F``.
    """
    if direction is None:
        return lora_A, scaling * lora_B, 0.0
    b_v, a_v, dropped = direction_factors(direction.to(lora_B.dtype), v_rank)
    return torch.cat([lora_A, a_v], 0), torch.cat([scaling * lora_B, gamma * b_v], 1), abs(gamma) * dropped


def pad_rank(lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad ``A`` with rows and ``B`` with columns to ``rank``; ``B A`` is unchanged."""
    r = lora_A.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a = torch.cat([lora_A, lora_A.new_zeros(rank - r, lora_A.shape[1])], 0)
    b = torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], rank - r)], 1)
    return a, b


def select_direction_modules(
    names: list[str], modules: list[str] | str | None, flag: str = "modules"
) -> list[str]:
    """The names in ``names`` that ``modules`` selects (PEFT semantics: suffixes or one regex; ``None``: all).

    Raises:
        ArgumentError: nothing is selected, a list entry matches no name, or the regex does not compile.
    """
    if modules is None:
        return list(names)
    if isinstance(modules, str):
        try:
            re.compile(modules)
        except re.error as err:
            raise ArgumentError(f"{flag}: {modules!r} is not a valid regular expression ({err})") from err
    else:
        if not modules:
            raise ArgumentError(f"{flag} is an empty list; leave it unset to select every module")
        for entry in modules:
            if not any(module_matches(n, [entry]) for n in names):
                raise ArgumentError(
                    f"{flag}: {entry!r} matches none of the direction's modules (e.g. {names[:3]}); entries are "
                    "module names or name suffixes such as 'q_proj' or 'layers.3.self_attn.v_proj'"
                )
    chosen = [n for n in names if module_matches(n, modules)]
    if not chosen:
        raise ArgumentError(
            f"{flag}: the regex {modules!r} matches none of the direction's modules (e.g. {names[:3]}); one string is "
            "a regex on the full name (e.g. '.*q_proj'), a list ([q_proj]) gives name suffixes"
        )
    return chosen


# --------------------------------------------------------------------------------------------------------------
# Checks (all before any work)
# --------------------------------------------------------------------------------------------------------------


def _check_arguments(
    model: str | None,
    adapter: str | None,
    gamma: float,
    output_format: str | None,
    v_rank: int | None,
) -> str:
    """Validate the settings; returns the output format."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(float(gamma)):
        raise ArgumentError(
            f"gamma must be a finite number (the multiple of V added back; RESTA: 1), got {gamma!r}"
        )
    if output_format not in (None, "model", "adapter"):
        raise ArgumentError(f"output_format must be 'model' or 'adapter', got {output_format!r}")
    if model is None and adapter is None:
        raise ArgumentError(
            "give model (a full fine-tune, or the base model of adapter) and/or adapter (a PEFT LoRA adapter)"
        )
    fmt = output_format or ("model" if model is not None else "adapter")
    if fmt == "model" and model is None:
        raise ArgumentError(
            "output_format 'model' merges the adapter into its base model: give model (the base model directory)"
        )
    if fmt == "adapter" and adapter is None:
        raise ArgumentError(
            "output_format 'adapter' needs adapter; a full fine-tune (model without adapter) is written as a model"
        )
    if v_rank is not None:
        if isinstance(v_rank, bool) or not isinstance(v_rank, int) or v_rank < 1:
            raise ArgumentError(
                f"v_rank must be an integer >= 1 (or unset for the exact factorisation), got {v_rank!r}"
            )
        if fmt != "adapter":
            raise ArgumentError(
                "v_rank only applies to output_format 'adapter' (the rank of V's factorisation); the model output "
                "adds V exactly"
            )
    return fmt


def _check_direction(directions: DirectionSet) -> None:
    """RESTA adds ``V`` itself: a low-rank file (basis only) or a zero / non-finite ``V`` is refused."""
    for name, md in directions.modules.items():
        if md.direction is None:
            raise DirectionError(
                f"{directions.path}: module {name} stores only a low-rank basis (projector "
                f"{directions.projector!r}, rank/energy set), not V itself; RESTA adds V, so make the file with "
                "'asft direction' without --rank / --energy"
            )
        if not torch.isfinite(md.direction).all():
            raise DirectionError(f"{directions.path}: tensor '{name}.direction' has non-finite values")


def _check_model(
    reader: CheckpointReader, directions: DirectionSet, lora: LoraAdapter | None, model: str
) -> dict[str, str]:
    """The model fits the direction (architecture, modules, shapes) and the adapter; returns module -> weight key."""
    if reader.gguf_file is not None:
        raise CheckpointError(
            f"model {model}: a GGUF file; RESTA writes a safetensors model directory, so give one (load the GGUF "
            "with transformers and save_pretrained it first)"
        )
    directions.check_model(architecture_fingerprint(reader.config), f"model {model}")
    keys = set(reader.keys())
    wanted = dict(directions.modules)
    if lora is not None:
        wanted.update({m: None for m in lora.shapes})
    out = {}
    for name in wanted:
        key = f"{name}.weight"
        if key not in keys:
            raise CheckpointError(
                f"model {model}: no tensor '{key}' for module {name} (of the direction file"
                f"{' and the adapter' if lora is not None and name in lora.shapes else ''}); was it made for "
                "another model?"
            )
        shape = tuple(reader.shape(key))
        expected = tuple(directions.modules[name].shape) if name in directions.modules else lora.shapes[name]
        if shape != expected:
            raise CheckpointError(
                f"model {model}: tensor '{key}' has shape {shape}, but the direction file / adapter expect "
                f"{expected}; was it made for another model?"
            )
        out[name] = key
    return out


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def resta(
    direction: str,
    output: str,
    model: str | None = None,
    adapter: str | None = None,
    gamma: float = 1.0,
    modules: list[str] | str | None = None,
    output_format: OutputFormat | None = None,
    v_rank: int | None = None,
    overwrite: bool = False,
) -> dict:
    """RESTA (arXiv 2402.11746): add gamma * V, the safety vector, back to a fine-tuned model's weights.

    Writes the re-aligned model (or adapter) to a new directory, atomically, with ``resta_report.json``; the inputs
    are only read. Every input is checked before any work.

    Args:
        direction: direction file from ``asft direction`` holding ``V`` itself (made without ``--rank`` /
            ``--energy``); its modules must be exactly the adapter's. RESTA's own safety vector is
            ``--reference harmful`` (aligned minus a harmful fine-tune); ``base`` (aligned minus unaligned) works too.
        output: directory to write (must not exist or be empty unless ``overwrite``).
        model: a full fine-tune (without ``adapter``), or the base model the adapter was trained on (needed for
            ``output_format: model``); a Hugging Face safetensors directory of the direction's architecture.
        adapter: PEFT LoRA adapter directory of the fine-tune.
        gamma: multiple of V added (RESTA adds the safety vector once: 1.0); any finite number.
        modules: add V only to these modules of the direction file: name suffixes (``[q_proj]``,
            ``[layers.0.self_attn.v_proj]``) or one regex on the full name. Default: every module in the file.
        output_format: ``model`` (merged full model ``W + s B A + gamma V``) or ``adapter`` (a PEFT adapter of
            rank ``r + k`` carrying ``s B A + gamma V``). Default: ``model`` when ``model`` is given, else ``adapter``.
        v_rank: with ``output_format: adapter``, factor V at this rank (its top singular vectors; the dropped part
            is reported). Unset: exact, rank ``min(d_out, d_in)`` per module.
        overwrite: replace a non-empty ``output`` directory.

    Returns:
        The report written to ``<output>/resta_report.json``.
    """
    fmt = _check_arguments(model, adapter, gamma, output_format, v_rank)
    gamma = float(gamma)
    direction_path, output_dir = Path(direction), Path(output)
    lora = read_adapter(adapter, RestaError, "RESTA") if adapter is not None else None
    if lora is not None and lora.config.get("fan_in_fan_out"):
        raise RestaError(
            f"{lora.path / ADAPTER_CONFIG}: fan_in_fan_out: true (a Conv1D model such as GPT-2) stores weights "
            "transposed; RESTA supports nn.Linear adapters only"
        )
    if lora is not None and fmt == "model" and lora.other_tensors():
        raise RestaError(
            f"{lora.weights_path}: holds tensors besides the LoRA factors ({lora.other_tensors()[:3]}, e.g. "
            "modules_to_save or LoRA biases) that RESTA cannot merge into the model; use output_format adapter"
        )
    directions = load_direction(direction_path)
    if lora is not None:
        directions.check_modules(lora.shapes, str(lora.weights_path))
    _check_direction(directions)
    names = list(directions.modules)
    chosen = select_direction_modules(names, modules)
    reader = CheckpointReader(model) if model is not None else None
    weight_keys = _check_model(reader, directions, lora, model) if reader is not None else {}
    inputs = {"direction file": direction_path}
    if lora is not None:
        inputs["adapter directory"] = lora.path
    if reader is not None:
        inputs["model directory"] = Path(reader.path)
    check_output(output_dir, inputs, overwrite, RestaError)

    report: dict[str, Any] = {
        "method": "resta (arXiv 2402.11746): W + s B A + gamma V",
        "settings": {
            "gamma": gamma,
            "modules": modules,
            "output_format": fmt,
            "v_rank": v_rank,
        },
        "direction": str(direction_path.resolve()),
        "direction_sha256": sha256_file(direction_path),
        "direction_reference": directions.metadata.get("reference"),
        "adapter": str(lora.path.resolve()) if lora is not None else None,
        "adapter_sha256": sha256_file(lora.weights_path) if lora is not None else None,
        "model": str(Path(reader.path).resolve()) if reader is not None else None,
        "output": str(output_dir.resolve()),
        "num_modules": len(names),
        "num_with_direction": len(chosen),
    }
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        md = directions.modules[name]
        entries[name] = {
            "shape": list(md.shape),
            "gamma_V": name in chosen,
            "direction_norm": float(md.norm),
        }
        if lora is not None:
            entries[name]["rank"] = lora.rank(name)
            entries[name]["scaling"] = lora.scaling(name)
    report["modules"] = entries

    if fmt == "adapter":
        _write_adapter(lora, directions, set(chosen), gamma, v_rank, output_dir, report)
    else:
        _write_model(reader, lora, directions, set(chosen), gamma, weight_keys, output_dir, report)
    summary = {
        "output": str(output_dir),
        "output_format": fmt,
        "modules": len(names),
        "with_gamma_V": len(chosen),
        "gamma": gamma,
    }
    if fmt == "adapter":
        summary["rank"] = report["rank"]
    print(json.dumps(summary, indent=2))
    return report


def _write_adapter(
    lora: LoraAdapter,
    directions: DirectionSet,
    chosen: set[str],
    gamma: float,
    v_rank: int | None,
    output_dir: Path,
    report: dict[str, Any],
) -> None:
    """The adapter output: factors of ``s B A + gamma V`` per module, zero-padded to one rank, scaling folded.

    The common rank is known from the shapes, so each module is padded and cast to the adapter's dtype as soon as
    it is computed: peak memory is the output plus one module in float64.
    """

    def v_rank_of(name: str) -> int:
        full = min(directions.modules[name].shape)
        return full if v_rank is None else min(v_rank, full)

    rank = max(lora.rank(n) + (v_rank_of(n) if n in chosen else 0) for n in lora.pairs)
    new_state = dict(lora.tensors)
    for name, (a_key, b_key) in lora.pairs.items():
        a, b = lora.factors(name)
        v = directions.modules[name].direction.double() if name in chosen else None
        a2, b2, dropped = resta_factors(a, b, lora.scaling(name), v, gamma, v_rank)
        entry = report["modules"][name]
        entry["factor_rank"] = int(a2.shape[0])
        if v is not None:
            entry["dropped_fro"] = dropped
            target = float(torch.linalg.matrix_norm(gamma * v)) if gamma else 0.0
            entry["dropped_relative"] = dropped / target if target > 0 else 0.0
        a2, b2 = pad_rank(a2, b2, rank)
        new_state[a_key] = a2.to(lora.tensors[a_key].dtype).contiguous()
        new_state[b_key] = b2.to(lora.tensors[b_key].dtype).contiguous()
        del a2, b2, v
    report["rank"] = rank
    config = merged_config(lora.config, rank)

    def build(tmp: Path) -> None:
        report["copied_files"] = copy_side_files(lora.path, tmp, skip={ADAPTER_CONFIG})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        meta = {**lora.header, "format": lora.header.get("format", "pt")}
        meta["asft_resta"] = json.dumps({"direction": report["direction"], "settings": report["settings"]})
        save_file(new_state, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, output_dir)


def _write_model(
    reader: CheckpointReader,
    lora: LoraAdapter | None,
    directions: DirectionSet,
    chosen: set[str],
    gamma: float,
    weight_keys: dict[str, str],
    output_dir: Path,
    report: dict[str, Any],
) -> None:
    """The model output: ``W + s B A + gamma V`` written shard by shard (computed in float64, stored in W's dtype)."""
    by_key = {key: name for name, key in weight_keys.items()}

    def edit(key: str, weight: Tensor) -> Tensor | None:
        name = by_key.get(key)
        if name is None:
            return None
        with_v = name in chosen
        has_lora = lora is not None and name in lora.pairs
        if not with_v and not has_lora:
            return None
        a, b = lora.factors(name) if has_lora else (None, None)
        v = directions.modules[name].direction.double()
        delta = resta_update(v, gamma if with_v else 0.0, a, b, lora.scaling(name) if has_lora else 1.0)
        report["modules"][name]["delta_norm"] = float(torch.linalg.matrix_norm(delta))
        return (weight.double() + delta).to(weight.dtype)

    def build(tmp: Path) -> None:
        report["edited_tensors"] = write_edited_model(reader, tmp, edit, save=save_file)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, output_dir)
