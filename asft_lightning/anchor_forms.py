"""The anchors ``AsFTModule`` trains with: what each adds to the loss, what it needs from the direction file.

Per LoRA module, with the update ``dW = B A`` (times ``alpha / r`` with ``include_lora_scale``), the penalty is

    anchor term  +  sign_weight * relu(-<dW, V>_F / ||V||_F)^2  +  component_weight * sum_i relu(-u_i^T dW v_i)^2

and the loss adds ``lam * sum_l penalty_l``. The anchor term (``model.anchor``):

* ``projector`` (default): ``||(I - C) dW||_F^2`` with the file's ``C``: the published ``V V^T / ||V||_F``
  (``asft direction --projector safelora``), its top-k eigenpairs (``--rank``), or the exact subspace projector
  ``U_k U_k^T`` (``--projector subspace``). The published AsFT.
* ``normalized``: ``||(I - C / lambda_max(C)) dW||_F^2``: ``V V^T / sigma_1^2`` for a full file, ``U diag(w / w_1)
  U^T`` for eigenpairs, ``U_k U_k^T`` for a subspace file. Scaling ``V`` changes nothing, so ``lam`` means the same
  on any model (the published ``C``'s eigenvalues ``sigma_i^2 / ||V||_F`` are at most 0.043 on the SmolLM2 world,
  where ``I - C ~ I``).
* ``harm_subspace``: ``||U_k U_k^T dW||_F^2`` with ``U_k`` from a *harmful-reference* direction (aligned minus a
  harmful fine-tune of it, ``asft direction --reference harmful --projector subspace --rank k``): keeps the update
  out of the subspace the harmful fine-tune moved in.
* ``inside``: ``||U_k U_k^T dW||_F^2`` with ``U_k`` from the *alignment* direction (``asft direction --reference
  base --projector subspace --rank k``): keeps the update out of the subspace the alignment wrote into, the opposite
  of the published form, which penalises the update outside it. Chosen from ``asft basin attribute`` on the SmolLM2
  world: the attack's update holds 23-31% of its energy inside V's top-32 subspace and that part carries 60% of the
  margin drop (``benchmarks/results/basin.md``).
* ``none``: no anchor term; only the sign terms (one of whose weights must then be > 0 when ``lam > 0``).

The sign terms are this project's extensions. ``sign_weight`` needs the full ``V`` (a ``safelora`` file without
``--rank``); ``component_weight`` needs ``V``'s singular components (``U_k`` and the right vectors ``V_k``: a
low-rank file from ``asft direction --rank k``). Both point the same way for either reference (``V`` points from
the unaligned or harmful model to the aligned one), so both work with either.

:func:`check_strengths` and :func:`check_direction` refuse what cannot work, before any model is loaded, with the
flag and the file in the message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from asft_lightning.direction import DirectionError, DirectionSet, ModuleDirection
from asft_lightning.errors import ArgumentError

__all__ = ["ANCHORS", "Anchor", "anchor_penalty", "check_direction", "check_forms", "check_reference", "check_strengths"]

Anchor = Literal["projector", "normalized", "harm_subspace", "inside", "none"]
ANCHORS: tuple[str, ...] = ("projector", "normalized", "harm_subspace", "inside", "none")
#: The reference each anchor term needs (``None``: any).
NEEDS_REFERENCE = {"projector": "base", "normalized": "base", "harm_subspace": "harmful", "inside": "base", "none": None}

PenaltyFn = Callable[[ModuleDirection, Tensor, Tensor], Tensor]


def _projector(md: ModuleDirection, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    return md.penalty(lora_A, lora_B)


def _normalized(md: ModuleDirection, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    return md.normalized_penalty(lora_A, lora_B)


def _inside_energy(md: ModuleDirection, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    return md.inside_energy(lora_A, lora_B)


_TERMS: dict[str, PenaltyFn | None] = {
    "projector": _projector,
    "normalized": _normalized,
    "harm_subspace": _inside_energy,
    "inside": _inside_energy,
    "none": None,
}


def anchor_penalty(anchor: str) -> PenaltyFn | None:
    """The anchor term ``(direction, lora_A, lora_B) -> scalar`` of ``anchor`` (``None`` for ``none``)."""
    if anchor not in _TERMS:
        raise ArgumentError(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    return _TERMS[anchor]


def check_strengths(lam: float, sign_weight: float, component_weight: float, anchor: str = "projector") -> list[str]:
    """Problems with the strengths (each must be a finite number >= 0) and the anchor name; empty if none."""
    problems = []
    for flag, value in (("lam", lam), ("sign_weight", sign_weight), ("component_weight", component_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problems.append(f"{flag} must be >= 0 and finite, got {value!r}")
    if anchor not in ANCHORS:
        problems.append(f"anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    elif anchor == "none" and not problems and lam > 0 and sign_weight == 0 and component_weight == 0:
        problems.append(
            "anchor none with sign_weight 0 and component_weight 0 adds no penalty, so lam > 0 does nothing: "
            "set sign_weight or component_weight > 0, another anchor, or lam 0 for plain LoRA SFT"
        )
    return problems


def check_direction(
    directions: DirectionSet, anchor: str, sign_weight: float = 0.0, component_weight: float = 0.0
) -> None:
    """Refuse a direction file that the chosen anchor and sign terms cannot use: :func:`check_reference`, then
    :func:`check_forms`.

    Raises:
        DirectionError: naming the flag (``model.anchor`` / ``model.sign_weight`` / ``model.component_weight``),
            the file, and the ``asft direction`` flags that make a file that works.
    """
    check_reference(directions, anchor)
    check_forms(directions.modules, anchor, sign_weight, component_weight, directions.path)


def check_reference(directions: DirectionSet, anchor: str) -> None:
    """Refuse a file whose reference (``base`` / ``harmful``) is not the one ``anchor``'s term needs."""
    path = directions.path
    reference = directions.reference
    needed = NEEDS_REFERENCE.get(anchor)
    if reference not in ("base", "harmful"):
        raise DirectionError(f"{path}: unknown reference {reference!r} in its metadata (expected base or harmful)")
    if needed is not None and reference != needed:
        if needed == "base":
            why = (
                "model.anchor=inside with a harmful-reference subspace is model.anchor=harm_subspace"
                if anchor == "inside"
                else "keeping the update inside that subspace would keep it where the harm lies"
            )
            raise DirectionError(
                f"model.anchor={anchor} needs an alignment direction (asft direction --reference base: aligned minus "
                f"the model before alignment), but {path} was made with --reference harmful (aligned minus a harmful "
                f"fine-tune): {why}. Use model.anchor=harm_subspace (or none with sign_weight / component_weight) "
                "with this file, or a --reference base direction"
            )
        raise DirectionError(
            f"model.anchor={anchor} needs a harmful-reference direction (asft direction --reference harmful: aligned "
            f"minus a harmful fine-tune of it), but {path} was made with --reference base (aligned minus the model "
            "before alignment): keeping the update out of that subspace would push it away from the alignment. "
            "Extract one with asft direction --reference harmful --projector subspace --rank k, or use "
            "model.anchor=projector / normalized with this file"
        )


def check_forms(
    modules: dict[str, ModuleDirection],
    anchor: str,
    sign_weight: float = 0.0,
    component_weight: float = 0.0,
    path: str = "the direction file",
) -> None:
    """Refuse a file that does not store what the terms compute with (full ``V``, a basis, right vectors)."""
    kinds = {md.kind for md in modules.values()}
    if anchor in ("harm_subspace", "inside") and kinds != {"subspace"}:
        which = "harmful" if anchor == "harm_subspace" else "base"
        raise DirectionError(
            f"model.anchor={anchor} needs an orthonormal basis U_k of the {which}-reference direction, but {path} "
            f"stores {_describe(kinds)}; extract it with asft direction --reference {which} --projector subspace "
            "--rank k"
        )
    if sign_weight > 0 and kinds != {"full"}:
        raise DirectionError(
            f"model.sign_weight > 0 needs the full direction V, but {path} stores {_describe(kinds)}; extract it "
            "with asft direction --projector safelora and no --rank / --energy (or use model.component_weight, "
            "the per-component sign term, which works with a low-rank file)"
        )
    if component_weight > 0:
        if "full" in kinds:
            raise DirectionError(
                f"model.component_weight > 0 needs V's top-k singular components (a low-rank file), but {path} "
                f"stores {_describe(kinds)}; extract one with asft direction --projector subspace --rank k "
                "(e.g. 32)"
            )
        lacking = sorted(name for name, md in modules.items() if md.right is None)
        if lacking:
            raise DirectionError(
                f"model.component_weight > 0 needs V's right singular vectors, but {path} has none for "
                f"{len(lacking)} module(s), e.g. {lacking[:3]} (written by an older asft direction); extract it "
                "again with asft direction --projector subspace --rank k"
            )


def _describe(kinds: set[str]) -> str:
    words = {
        "full": "the full V (--projector safelora without --rank)",
        "eigenpairs": "the published C's top-k eigenpairs (--projector safelora --rank k)",
        "subspace": "a subspace basis U_k (--projector subspace)",
    }
    return " and ".join(words[k] for k in sorted(kinds))
