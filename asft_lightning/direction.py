"""The alignment direction ``V_l = W_l(aligned) - W_l(unaligned)``: streaming extraction, file format, projectors.

A direction file is one safetensors file. Per targeted module ``<name>`` (the module's name in the base model,
e.g. ``model.layers.0.self_attn.q_proj``) it holds some of

* ``<name>.direction``: ``V`` itself, ``(d_out, d_in)`` (projector ``safelora``, full rank);
* ``<name>.basis``: ``U_k``, the top-``k`` left singular vectors of ``V``, ``(d_out, k)``;
* ``<name>.weights``: ``w``, the eigenvalues of ``C`` on ``U_k`` (projector ``safelora`` kept low rank);
* ``<name>.right``: the matching top-``k`` right singular vectors of ``V``, ``(d_in, k)`` (low-rank forms; with
  ``U_k`` they give ``V``'s singular components ``u_i v_i^T`` for the per-component sign penalty);
* ``<name>.singular``: all singular values of ``V``, descending, float64;
* ``<name>.norm``: ``||V||_F`` (a scalar, always present).

Files written before ``right`` / ``singular`` existed still load; the forms that need them say so.

and the JSON metadata (source paths, input hashes, module shapes, dtype, projector, spectrum) under the
safetensors header key ``asft``; the same JSON is written beside it as ``<file>.json`` for people to read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from asft_lightning import regularizers as R
from asft_lightning.adapter_io import ADAPTER_CONFIG, read_adapter
from asft_lightning.checkpoints import CheckpointError, CheckpointReader, architecture_fingerprint
from asft_lightning.errors import AsftError
from asft_lightning.fileio import atomic_write_bytes, atomic_write_file, atomic_write_text, sha256_file  # noqa: F401 (the writers' old home)

FORMAT_VERSION = 1
Projector = Literal["safelora", "subspace"]


class DirectionError(AsftError, ValueError):
    """A direction file is missing, corrupt, or does not fit the model. The message names the file."""


def module_matches(name: str, target_modules: str | list[str]) -> bool:
    """Whether ``name`` is targeted, with PEFT's ``target_modules`` semantics.

    A string is a regular expression that must match the full name; a list matches a name equal to an entry or
    ending in ``.<entry>``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


@dataclass
class ModuleDirection:
    """The projector ``C`` of one module, in whichever form the file stores it.

    Attributes:
        name: module name in the base model.
        shape: ``(d_out, d_in)`` of the module's weight.
        norm: ``||V||_F``.
        direction: ``V`` (full form) or ``None``.
        basis: ``U_k`` (low-rank forms) or ``None``.
        weights: eigenvalues of ``C`` on ``U_k``; ``None`` with a basis means the orthogonal projector.
        right: the top-``k`` right singular vectors of ``V`` matching ``basis`` (``(d_in, k)``) or ``None``.
        singular: singular values of ``V``, descending (all of them, or at least the top one), or ``None``.
    """

    name: str
    shape: tuple[int, int]
    norm: Tensor
    direction: Tensor | None = None
    basis: Tensor | None = None
    weights: Tensor | None = None
    right: Tensor | None = None
    singular: Tensor | None = None

    @property
    def kind(self) -> str:
        """``full`` (``V`` stored), ``eigenpairs`` (the published ``C``'s top-k eigenpairs) or ``subspace``."""
        if self.basis is None:
            return "full"
        return "subspace" if self.weights is None else "eigenpairs"

    def apply(self, matrix: Tensor) -> Tensor:
        """``C @ matrix`` for a ``(d_out, r)`` matrix."""
        if self.basis is not None:
            return R.lowrank_apply(matrix, self.basis, self.weights)
        return R.safelora_apply(matrix, self.direction, self.norm)

    def penalty(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``||(I - C) B A||_F^2`` with this module's ``C``."""
        return R.frobenius_of_product(lora_B - self.apply(lora_B), lora_A)

    def top_singular_value(self) -> Tensor:
        """``sigma_1`` of ``V``: from ``singular``, else from the eigenpairs (``sqrt(w_1 ||V||_F)``), else computed
        from ``V`` once (files written before ``singular`` was stored) and kept in ``singular``."""
        if self.singular is not None:
            return self.singular[0]
        if self.weights is not None:
            return (self.weights.max() * self.norm).sqrt()
        if self.direction is None:
            raise DirectionError(f"module {self.name}: a subspace basis carries no singular values")
        self.singular = torch.linalg.matrix_norm(self.direction.double(), ord=2).reshape(1)
        return self.singular[0]

    def normalized_penalty(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``||(I - C / lambda_max(C)) B A||_F^2`` with this module's ``C``: ``V V^T / sigma_1^2`` (full),
        ``U diag(w / max w) U^T`` (eigenpairs), ``U U^T`` (subspace, already of top eigenvalue 1)."""
        if self.basis is not None:
            weights = None if self.weights is None else self.weights / self.weights.max()
            return R.lowrank_penalty(lora_A, lora_B, self.basis, weights)
        return R.normalized_penalty(lora_A, lora_B, self.direction, self.top_singular_value())

    def inside_energy(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``||U U^T B A||_F^2``: the update's energy inside the stored subspace (needs ``basis``)."""
        return R.inside_energy(lora_A, lora_B, self.basis)

    def component_sign_penalty(self, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """``sum_i relu(-u_i^T B A v_i)^2`` over the stored singular components (needs ``basis`` and ``right``)."""
        return R.component_sign_penalty(lora_A, lora_B, self.basis, self.right)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModuleDirection:
        """A copy on ``device`` (and ``dtype``, if given); tensors already there are not copied."""

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return ModuleDirection(
            self.name, self.shape, mv(self.norm), mv(self.direction), mv(self.basis), mv(self.weights),
            mv(self.right), mv(self.singular),
        )


@dataclass
class DirectionSet:
    """All modules of one direction file plus its metadata."""

    path: str
    metadata: dict[str, Any]
    modules: dict[str, ModuleDirection] = field(default_factory=dict)

    @property
    def projector(self) -> str:
        return self.metadata["projector"]["kind"]

    @property
    def reference(self) -> str:
        """What ``V`` was taken against: ``base`` (the model before alignment) or ``harmful`` (a harmful fine-tune
        of the aligned model). Files that do not say are ``base``."""
        return self.metadata.get("reference", "base")

    def check_model(self, fingerprint: dict[str, Any], source: str) -> None:
        """Raise :class:`DirectionError` if the file was made for another architecture than ``fingerprint``."""
        mine = self.metadata.get("architecture", {})
        diff = {k: (mine[k], fingerprint[k]) for k in mine if k in fingerprint and mine[k] != fingerprint[k]}
        if diff:
            detail = ", ".join(f"{k}: file has {a}, model has {b}" for k, (a, b) in diff.items())
            raise DirectionError(f"{self.path}: made for another model than {source} ({detail})")

    def check_modules(self, shapes: dict[str, tuple[int, int]], source: str) -> None:
        """Raise :class:`DirectionError` unless the file covers exactly the modules in ``shapes`` with equal shapes."""
        missing = sorted(set(shapes) - set(self.modules))
        extra = sorted(set(self.modules) - set(shapes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no direction for {len(missing)} targeted module(s) of {source}, e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} direction(s) for modules {source} does not target, e.g. {extra[:3]}")
            raise DirectionError(f"{self.path}: made for another set of modules: " + "; ".join(parts))
        for name, shape in shapes.items():
            if tuple(self.modules[name].shape) != tuple(shape):
                raise DirectionError(
                    f"{self.path}: module {name} has shape {tuple(self.modules[name].shape)} in the direction "
                    f"file but {tuple(shape)} in {source}"
                )


def load_direction(path: str | os.PathLike, device: str | torch.device = "cpu") -> DirectionSet:
    """Load and validate a direction file written by :func:`extract_direction`.

    Raises:
        DirectionError: the file is missing, not a safetensors file, or lacks the AsFT metadata or tensors.
    """
    path = str(path)
    if not Path(path).is_file():
        raise DirectionError(f"{path}: direction file not found")
    try:
        with safe_open(path, framework="pt", device=str(device)) as fh:
            header = fh.metadata() or {}
            if "asft" not in header:
                raise DirectionError(f"{path}: not an AsFT direction file (no 'asft' metadata in the header)")
            metadata = json.loads(header["asft"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except DirectionError:
        raise
    except Exception as err:
        raise DirectionError(f"{path}: corrupt or unreadable direction file ({err})") from err
    if not isinstance(metadata, dict):
        raise DirectionError(f"{path}: the 'asft' metadata must be a JSON object, got {type(metadata).__name__}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise DirectionError(f"{path}: format_version {metadata.get('format_version')}, expected {FORMAT_VERSION}")
    if not isinstance(metadata.get("modules"), dict) or "projector" not in metadata:
        raise DirectionError(f"{path}: the 'asft' metadata lacks 'modules' (name -> shape) or 'projector'")
    out = DirectionSet(path=path, metadata=metadata)
    for name, shape in metadata["modules"].items():
        if f"{name}.norm" not in tensors:
            raise DirectionError(f"{path}: tensor '{name}.norm' missing")
        md = ModuleDirection(
            name=name,
            shape=tuple(shape),
            norm=tensors[f"{name}.norm"],
            direction=tensors.get(f"{name}.direction"),
            basis=tensors.get(f"{name}.basis"),
            weights=tensors.get(f"{name}.weights"),
            right=tensors.get(f"{name}.right"),
            singular=tensors.get(f"{name}.singular"),
        )
        if md.direction is None and md.basis is None:
            raise DirectionError(f"{path}: module {name} has neither '{name}.direction' nor '{name}.basis'")
        top = ((metadata.get("spectrum") or {}).get(name) or {}).get("top_singular_values")
        if md.singular is None and top:  # files written before '<name>.singular': the metadata's top values
            md.singular = torch.tensor(top, dtype=torch.float64)
        if md.right is not None and (
            md.basis is None or tuple(md.right.shape) != (md.shape[1], md.basis.shape[1])
        ):
            raise DirectionError(
                f"{path}: module {name}: '{name}.right' has shape {tuple(md.right.shape)}, expected "
                f"(d_in, k) = ({md.shape[1]}, {md.basis.shape[1] if md.basis is not None else '?'}) beside its basis"
            )
        out.modules[name] = md
    return out


def numerical_rank(s: Tensor, shape: tuple[int, ...]) -> int:
    """How many singular values of a float32-valued matrix are above its rounding noise:
    ``sigma_i > sigma_1 * max(d_out, d_in) * eps(float32)`` (at least 1)."""
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


def _top_basis(v: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """Top left and right singular vectors of ``v`` (``(d_out, k)``, ``(d_in, k)``) and all its singular values;
    ``k`` by ``rank`` or ``energy``, never beyond ``v``'s numerical rank (the singular vectors of a zero singular
    value are arbitrary, e.g. past rank ``r`` of a direction taken from a rank-``r`` LoRA adapter)."""
    u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
    if rank is not None:
        k = min(rank, s.numel())
    else:
        cumulative = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-300)
        k = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
        k = min(k, s.numel())
    k = min(k, numerical_rank(s, tuple(v.shape)))
    return u[:, :k], vh[:k].mT, s


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary file in the same directory, then rename it into place."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def _targeted_weights(reader: CheckpointReader, target_modules: str | list[str]) -> list[str]:
    names = []
    for key in reader.keys():
        if key.endswith(".weight") and len(reader.shape(key)) == 2 and module_matches(key[:-7], target_modules):
            names.append(key[:-7])
    return sorted(names, key=_natural_key)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


class AdapterReference:
    """A PEFT LoRA adapter trained on the aligned model, read as the checkpoint ``W_aligned + s B A``.

    Only what :func:`extract_direction` needs: the adapted modules' weight keys and shapes, and per module the
    direction ``W_aligned - (W_aligned + s B A) = -s B A`` itself (exact, no subtraction of two large weights).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.adapter = read_adapter(path, error=DirectionError, method="asft direction", flag="unaligned")
        self.path = str(path)
        self.gguf_file = None
        self.base_model = self.adapter.config.get("base_model_name_or_path")

    def keys(self) -> list[str]:
        return [f"{m}.weight" for m in self.adapter.pairs]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.adapter.shapes[key[: -len(".weight")]])

    def check_covers(self, names: list[str], shapes: dict[str, tuple[int, ...]], aligned: str) -> None:
        """Refuse targeted modules the adapter does not adapt: their direction would be zero."""
        missing = [n for n in names if n not in self.adapter.pairs]
        if missing:
            raise DirectionError(
                f"unaligned adapter {self.path} adapts {len(self.adapter.pairs)} module(s) but not {len(missing)} "
                f"targeted one(s) of {aligned}, e.g. {missing[:3]}: their direction would be zero; give "
                "target_modules the adapter's modules, or make the harmful fine-tune's LoRA target these too"
            )

    def direction(self, name: str) -> Tensor:
        """``-s B A`` of module ``name`` (float32, computed in float64)."""
        a, b = self.adapter.factors(name)
        return (-self.adapter.scaling(name) * (b @ a)).to(torch.float32)

    def release(self) -> None:
        pass

    def file_hashes(self) -> dict[str, str]:
        return {str(self.adapter.weights_path): sha256_file(self.adapter.weights_path)}


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def extract_direction(
    aligned: str,
    unaligned: str,
    output: str,
    target_modules: str | list[str] = ("q_proj", "v_proj"),
    projector: Projector = "safelora",
    rank: int | None = None,
    energy: float | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
    aligned_gguf_file: str | None = None,
    unaligned_gguf_file: str | None = None,
    reference: Literal["base", "harmful"] = "base",
    hash_inputs: bool = True,
    spectrum_size: int = 8,
) -> DirectionSet:
    """Compute ``V = W_aligned - W_unaligned`` for every targeted module, streaming one tensor at a time.

    Args:
        aligned: the safety-aligned checkpoint (HF directory or ``.gguf`` file).
        unaligned: the reference checkpoint: the base model before alignment (``reference: base``) or a
            harmful fine-tune of the aligned model (``reference: harmful``, direction = aligned minus harmful).
            With ``reference: harmful`` it may also be a PEFT LoRA adapter trained on ``aligned`` (e.g. ``asft fit
            --model.lam 0 --data.harmful_ratio 1`` on attack-style pairs): the direction is then exactly
            ``-s B A`` per adapted module, and every targeted module must be adapted.
        output: path of the ``.safetensors`` file to write (``<output>.json`` is written beside it).
        target_modules: module names (PEFT semantics: a list of name suffixes, or one regex for the full name).
        projector: ``safelora``: ``C = V V^T / ||V||_F`` as published (stored as ``V``, or as its top ``rank``
            eigenpairs when ``rank``/``energy`` is set); ``subspace``: the exact orthogonal projector onto the
            top-``k`` left singular vectors of ``V`` (``k`` from ``rank`` or ``energy``).
        rank: number of singular vectors kept (low-rank forms).
        energy: keep the smallest ``k`` whose singular values hold this share of ``||V||_F^2`` (0 < energy <= 1).
        dtype: storage dtype of the tensors in the file.
        aligned_gguf_file: GGUF file name inside ``aligned`` when it is a directory.
        unaligned_gguf_file: GGUF file name inside ``unaligned`` when it is a directory.
        reference: what ``unaligned`` is; recorded in the metadata. The anchors check it: the projector forms
            and ``inside`` need ``base``, ``harm_subspace`` needs ``harmful`` (:mod:`asft_lightning.anchor_forms`).
        hash_inputs: record SHA-256 of every input file (reads each input once more).
        spectrum_size: how many top singular values per module to record in the metadata.

    Returns:
        The written :class:`DirectionSet`.
    """
    if projector not in ("safelora", "subspace"):
        raise DirectionError(f"projector must be 'safelora' or 'subspace', got {projector!r}")
    if rank is not None and rank < 1:
        raise DirectionError(f"rank must be >= 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise DirectionError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and energy is not None:
        raise DirectionError("give rank or energy, not both")
    if projector == "subspace" and rank is None and energy is None:
        raise DirectionError("projector 'subspace' needs rank (e.g. 32) or energy (e.g. 0.9)")
    lowrank = rank is not None or energy is not None
    out_dtype = getattr(torch, dtype)
    out_path = Path(output)
    if out_path.suffix != ".safetensors":
        raise DirectionError(f"{output}: the output file must end in .safetensors")

    a_reader = CheckpointReader(aligned, aligned_gguf_file)
    a_fp = architecture_fingerprint(a_reader.config)
    adapter_ref = is_adapter_dir(unaligned)
    if adapter_ref:
        if reference != "harmful":
            raise DirectionError(
                f"unaligned {unaligned} is a PEFT adapter, i.e. the aligned model plus a fine-tune of it: as the "
                "reference that is a harmful fine-tune, so give --reference harmful (a base model is a checkpoint)"
            )
        if unaligned_gguf_file is not None:
            raise DirectionError(f"unaligned {unaligned} is a PEFT adapter; unaligned_gguf_file does not apply to it")
        u_reader: Any = AdapterReference(unaligned)
    else:
        u_reader = CheckpointReader(unaligned, unaligned_gguf_file)
        u_fp = architecture_fingerprint(u_reader.config)
        if a_fp != u_fp:
            diff = {k: (a_fp.get(k), u_fp.get(k)) for k in set(a_fp) | set(u_fp) if a_fp.get(k) != u_fp.get(k)}
            detail = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in sorted(diff.items()))
            raise CheckpointError(
                f"aligned {a_reader.path} and unaligned {u_reader.path} have different architectures ({detail})"
            )
    names = _targeted_weights(a_reader, list(target_modules) if not isinstance(target_modules, str) else target_modules)
    if not names:
        sample = sorted({k.rsplit(".", 2)[-2] for k in a_reader.keys() if k.endswith(".weight") and "." in k})
        raise DirectionError(
            f"target_modules {target_modules!r} match no linear weight in {a_reader.path}; "
            f"module names there end in e.g. {sample[:12]}"
        )
    if adapter_ref:
        u_reader.check_covers(names, {name: tuple(a_reader.shape(f"{name}.weight")) for name in names}, a_reader.path)
    u_keys = set(u_reader.keys())
    for name in names:
        key = f"{name}.weight"
        if key not in u_keys:
            raise CheckpointError(f"{u_reader.path}: tensor '{key}' missing (present in {a_reader.path})")
        if a_reader.shape(key) != u_reader.shape(key):
            raise CheckpointError(
                f"tensor '{key}' has shape {a_reader.shape(key)} in {a_reader.path} "
                f"but {u_reader.shape(key)} in {u_reader.path}"
            )

    tensors: dict[str, Tensor] = {}
    modules: dict[str, list[int]] = {}
    spectrum: dict[str, dict[str, Any]] = {}
    for name in names:
        key = f"{name}.weight"
        if adapter_ref:  # W_aligned - (W_aligned + s B A), exactly
            v = u_reader.direction(name)
        else:
            v = a_reader.get(key).to(torch.float32) - u_reader.get(key).to(torch.float32)
        if not torch.isfinite(v).all():
            raise CheckpointError(f"tensor '{key}': non-finite values in {a_reader.path} or {u_reader.path}")
        norm = torch.linalg.vector_norm(v.double())
        if norm == 0:
            raise DirectionError(
                f"tensor '{key}' is identical in {a_reader.path} and {u_reader.path}: the alignment direction of "
                f"module {name} is zero, so no projector can be built; check that the two checkpoints differ "
                "or leave this module out of target_modules"
            )
        modules[name] = list(v.shape)
        tensors[f"{name}.norm"] = norm.to(out_dtype)
        if lowrank or spectrum_size:
            basis, right, s = _top_basis(v, rank, energy) if lowrank else (None, None, torch.linalg.svdvals(v.double()))
            tensors[f"{name}.singular"] = s.contiguous()
            nrm = float(norm)
            spectrum[name] = {
                "norm": nrm,
                "top_singular_values": [float(x) for x in s[:spectrum_size]],
                "top_C_eigenvalue_safelora": float(s[0] ** 2 / nrm) if nrm > 0 else 0.0,
            }
        if lowrank:
            k = basis.shape[1]
            tensors[f"{name}.basis"] = basis.to(out_dtype)
            tensors[f"{name}.right"] = right.to(out_dtype)
            kept = float(s[:k].square().sum() / s.square().sum().clamp_min(1e-300))
            spectrum[name].update(k=k, energy_kept=kept)
            if projector == "safelora":
                # C = V V^T / ||V|| restricted to its top-k eigenpairs; the dropped eigenvalues are reported.
                tensors[f"{name}.weights"] = (s[:k].square() / norm).to(out_dtype)
                spectrum[name]["truncation_error_fro"] = float(torch.linalg.vector_norm(s[k:].square()) / norm)
        else:
            tensors[f"{name}.direction"] = v.to(out_dtype)
    a_reader.release()
    u_reader.release()

    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "aligned": {"path": str(Path(a_reader.path).resolve()), "gguf_file": a_reader.gguf_file},
        "unaligned": {"path": str(Path(u_reader.path).resolve()), "gguf_file": u_reader.gguf_file},
        "reference": reference,
        "architecture": a_fp,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "modules": modules,
        "dtype": dtype,
        "projector": {"kind": projector, "rank": rank, "energy": energy, "lowrank": lowrank},
        "spectrum": spectrum,
    }
    if adapter_ref:
        metadata["unaligned"].update(adapter=True, base_model=u_reader.base_model)
    if hash_inputs:
        metadata["aligned"]["sha256"] = a_reader.file_hashes()
        metadata["unaligned"]["sha256"] = u_reader.file_hashes()
    text = json.dumps(metadata, indent=2)
    atomic_save_safetensors(tensors, out_path, {"asft": json.dumps(metadata)})
    atomic_write_text(text + "\n", out_path.with_name(out_path.name + ".json"))
    return load_direction(out_path)


def spectrum_summary(directions: DirectionSet) -> dict[str, float]:
    """Aggregate figures of ``C``'s spectrum over modules: the largest eigenvalue of the published ``C``, ``||V||``."""
    spec = directions.metadata.get("spectrum", {})
    tops = [m["top_C_eigenvalue_safelora"] for m in spec.values()]
    norms = [m["norm"] for m in spec.values()]
    if not tops:
        return {}
    return {
        "modules": len(tops),
        "max_C_eigenvalue": max(tops),
        "median_C_eigenvalue": sorted(tops)[len(tops) // 2],
        "median_direction_norm": sorted(norms)[len(norms) // 2],
        "mean_direction_norm": math.fsum(norms) / len(norms),
    }
