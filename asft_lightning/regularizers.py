"""Pure tensor math of the AsFT regulariser. No Lightning, no PEFT: tensors in, tensors out.

Shapes follow PEFT: ``lora_A`` is ``(r, d_in)``, ``lora_B`` is ``(d_out, r)``, so the LoRA update is
``dW = s * B @ A`` with ``s = alpha / r``. No function here ever builds a ``d_out x d_out`` matrix:

* ``||X A||_F^2 = sum((X^T X) * (A A^T))`` costs ``O((d_out + d_in) r^2)`` once ``X`` (``d_out x r``) is known;
* the published projector ``C = V V^T / ||V||_F`` is applied as ``C B = V (V^T B) / ||V||_F`` in
  ``O(d_out d_in r)``;
* a low-rank projector ``C = U diag(w) U^T`` is applied as ``U (w * (U^T B))`` in ``O(d_out k r)``;
* the update's coordinates on ``V``'s singular components, ``u_i^T B A v_i``, are the diagonal of
  ``(U^T B)(A V_r)`` in ``O((d_out + d_in) k r)``.

Every function is differentiable and returns the dtype of the LoRA factors (float64 in, float64 out). Products
with a stored direction or basis run in *its* dtype: the small ``d_out x r`` factor is cast, never the large
direction, so a bfloat16 direction stays bfloat16 on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "asft_penalty",
    "component_coordinates",
    "component_sign_penalty",
    "frobenius_of_product",
    "inside_energy",
    "lowrank_apply",
    "lowrank_penalty",
    "normalized_apply",
    "normalized_penalty",
    "safelora_apply",
    "sign_aware_penalty",
    "subspace_penalty",
    "update_alignment",
    "update_energy",
]


def frobenius_of_product(left: Tensor, right: Tensor) -> Tensor:
    """``||left @ right||_F^2`` for a tall ``left`` (``m x r``) and wide ``right`` (``r x n``).

    Uses the Gram identity ``||L R||_F^2 = sum((L^T L) * (R R^T))`` so the ``m x n`` product is never formed.
    """
    return ((left.mT @ left) * (right @ right.mT)).sum()


def update_energy(lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """``||B A||_F^2``: the squared size of the (unscaled) LoRA update."""
    return frobenius_of_product(lora_B, lora_A)


def safelora_apply(matrix: Tensor, direction: Tensor, direction_norm: Tensor | None = None) -> Tensor:
    """Apply the published projector ``C = V V^T / ||V||_F`` to ``matrix`` (``d_out x r``) without forming ``C``.

    Args:
        matrix: ``(d_out, r)`` tensor, usually ``lora_B``.
        direction: the alignment direction ``V`` of shape ``(d_out, d_in)``.
        direction_norm: ``||V||_F`` if already known (saves one pass over ``V``).

    Returns:
        ``C @ matrix`` in the dtype of ``matrix``.
    """
    m = matrix.to(direction.dtype)
    norm = torch.linalg.vector_norm(direction) if direction_norm is None else direction_norm.to(direction.dtype)
    # Written with the thin factor on the left: (r x d_out) @ (d_out x d_in) runs ~10x faster on CPU than the
    # transposed-weight form V^T @ B (measured in benchmarks/results/regularizer.md); same value.
    coeff = m.mT @ direction  # (r, d_in) = (V^T B)^T
    return ((coeff @ direction.mT).mT / norm).to(matrix.dtype)


def lowrank_apply(matrix: Tensor, basis: Tensor, weights: Tensor | None = None) -> Tensor:
    """Apply ``C = U diag(w) U^T`` (``w = 1``: the orthogonal projector ``U U^T``) to ``matrix``.

    Args:
        matrix: ``(d_out, r)`` tensor, usually ``lora_B``.
        basis: ``U``, ``(d_out, k)`` with orthonormal columns.
        weights: ``w``, ``(k,)`` eigenvalues of ``C``; ``None`` means all ones.
    """
    coeff = matrix.to(basis.dtype).mT @ basis  # (r, k) = (U^T B)^T, thin factor on the left as above
    if weights is not None:
        coeff = coeff * weights.to(basis.dtype)[None, :]
    return (coeff @ basis.mT).mT.to(matrix.dtype)


def asft_penalty(
    lora_A: Tensor, lora_B: Tensor, direction: Tensor, direction_norm: Tensor | None = None
) -> Tensor:
    """AsFT penalty ``||(I - C) B A||_F^2`` with ``C = V V^T / ||V||_F``, as the authors' code builds ``C``.

    Note that this ``C`` is divided by the norm, not the squared norm, so it is not idempotent: its eigenvalues
    are ``sigma_i^2 / ||V||_F``. Cost ``O(d_out d_in r)``; no ``d_out x d_out`` matrix is formed.

    Args:
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        direction: ``V = W_aligned - W_unaligned``, ``(d_out, d_in)``.
        direction_norm: ``||V||_F`` if precomputed.

    Returns:
        A scalar tensor in the dtype of ``lora_B``.
    """
    residual = lora_B - safelora_apply(lora_B, direction, direction_norm)
    return frobenius_of_product(residual, lora_A)


def lowrank_penalty(lora_A: Tensor, lora_B: Tensor, basis: Tensor, weights: Tensor | None = None) -> Tensor:
    """``||(I - U diag(w) U^T) B A||_F^2``: AsFT with ``C`` kept as ``k`` eigenpairs. Cost ``O(d_out k r)``."""
    residual = lora_B - lowrank_apply(lora_B, basis, weights)
    return frobenius_of_product(residual, lora_A)


def subspace_penalty(lora_A: Tensor, lora_B: Tensor, basis: Tensor) -> Tensor:
    """``||(I - U U^T) B A||_F^2`` for an orthonormal ``U`` (``d_out x k``): the exact orthogonal projector.

    With this form ``sqrt(penalty / ||B A||_F^2)`` is in ``[0, 1]``: the share of the update off the basin.
    """
    return lowrank_penalty(lora_A, lora_B, basis, None)


def update_alignment(lora_A: Tensor, lora_B: Tensor, direction: Tensor) -> Tensor:
    """``<B A, V>_F / ||V||_F``: the signed length of the update along the alignment direction.

    Computed as ``sum(B * (V A^T))`` in ``O(d_out d_in r)``; positive means the update moves *with* the
    alignment (towards the aligned model), negative means it undoes it.
    """
    va = (lora_A.to(direction.dtype) @ direction.mT).mT.to(lora_B.dtype)  # V A^T, thin factor on the left
    return (lora_B * va).sum() / torch.linalg.vector_norm(direction).to(lora_B.dtype)


def sign_aware_penalty(lora_A: Tensor, lora_B: Tensor, direction: Tensor) -> Tensor:
    """``relu(-<B A, V>_F / ||V||_F)^2``: penalises only the part of the update that moves against ``V``.

    This is this project's extension (design.md section 5), not part of the published AsFT: an update that
    undoes the alignment lies inside ``V``'s subspace, so the orthogonal penalty alone cannot stop it.
    """
    return torch.relu(-update_alignment(lora_A, lora_B, direction)).square()


# ------------------------------------------------------------------------------------------------------------------
# Candidate anchors (issue 13): forms whose strength does not hang on ||V||_F, and sign awareness per component.
# ------------------------------------------------------------------------------------------------------------------


def normalized_apply(matrix: Tensor, direction: Tensor, top_singular_value: Tensor) -> Tensor:
    """Apply ``C_n = V V^T / sigma_1^2`` (the published ``C`` divided by its top eigenvalue) to ``matrix``.

    ``C_n``'s eigenvalues are ``sigma_i^2 / sigma_1^2`` in ``(0, 1]``: scaling ``V`` changes nothing, so the
    penalty's strength does not depend on ``||V||_F`` (the published ``C``'s eigenvalues are ``sigma_i^2 / ||V||_F``).

    Args:
        matrix: ``(d_out, r)`` tensor, usually ``lora_B``.
        direction: ``V``, ``(d_out, d_in)``.
        top_singular_value: ``sigma_1``, the largest singular value of ``V`` (a scalar tensor).
    """
    m = matrix.to(direction.dtype)
    coeff = m.mT @ direction  # (r, d_in), thin factor on the left as in safelora_apply
    return ((coeff @ direction.mT).mT / top_singular_value.to(direction.dtype).square()).to(matrix.dtype)


def normalized_penalty(lora_A: Tensor, lora_B: Tensor, direction: Tensor, top_singular_value: Tensor) -> Tensor:
    """``||(I - V V^T / sigma_1^2) B A||_F^2``: the published penalty with ``C`` scaled to top eigenvalue 1.

    Cost ``O(d_out d_in r)``; no ``d_out x d_out`` matrix. With ``C`` kept as eigenpairs ``U diag(w) U^T`` the same
    form is :func:`lowrank_penalty` with ``w / max(w)``.
    """
    residual = lora_B - normalized_apply(lora_B, direction, top_singular_value)
    return frobenius_of_product(residual, lora_A)


def inside_energy(lora_A: Tensor, lora_B: Tensor, basis: Tensor) -> Tensor:
    """``||U U^T B A||_F^2 = ||(U^T B) A||_F^2``: the update's energy inside ``span(U)`` (``U`` orthonormal).

    As a penalty with ``U`` from a harmful-reference direction (aligned minus a harmful fine-tune) it keeps the
    update out of the subspace the harmful fine-tune moved in. Cost ``O(d_out k r + d_in r^2)``.
    """
    coeff = (lora_B.to(basis.dtype).mT @ basis).mT.to(lora_B.dtype)  # (k, r) = U^T B
    return frobenius_of_product(coeff, lora_A)


def component_coordinates(lora_A: Tensor, lora_B: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``c_i = u_i^T (B A) v_i`` for ``V``'s top-``k`` singular components ``(u_i, v_i)``: shape ``(k,)``.

    ``c_i`` is the update's coordinate on the unit matrix ``u_i v_i^T``; ``V = sum_i sigma_i u_i v_i^T`` with
    ``sigma_i > 0``, so ``c_i > 0`` moves *with* component ``i`` of the alignment and ``c_i < 0`` undoes it.
    Computed as the diagonal of ``(U^T B)(A V_r)`` in ``O((d_out + d_in) k r)``.

    Args:
        lora_A: ``(r, d_in)``.
        lora_B: ``(d_out, r)``.
        left: ``U``, ``(d_out, k)``, left singular vectors of ``V``.
        right: ``V_r``, ``(d_in, k)``, the matching right singular vectors.
    """
    ub = (lora_B.to(left.dtype).mT @ left).to(lora_B.dtype)  # (r, k) = (U^T B)^T
    av = (lora_A.to(right.dtype) @ right).to(lora_A.dtype)  # (r, k) = A V_r
    return (ub * av).sum(0)


def component_sign_penalty(lora_A: Tensor, lora_B: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``sum_i relu(-u_i^T B A v_i)^2``: no motion against any of ``V``'s top-``k`` singular components.

    The whole-``V`` term :func:`sign_aware_penalty` only sees the sum ``sum_i sigma_i c_i / ||V||_F``: an update
    can undo component 1 while adding component 2 and pass it. Here every component counts on its own, and unit
    components make the strength independent of ``||V||_F``. This project's extension, not the published AsFT.
    """
    return torch.relu(-component_coordinates(lora_A, lora_B, left, right)).square().sum()
