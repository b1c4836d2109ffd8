"""``benchmarks/regularizer_bench.py``: the ``inside`` variant of the penalty micro-benchmark computes the
``inside`` anchor's term ``||U_k U_k^T B A||_F^2`` (through the package's own function), in float64 against the
dense formula with ``U_k U_k^T`` materialised: value and gradient w.r.t. ``(A, B)``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark imports its sibling benchlib
_spec = importlib.util.spec_from_file_location(
    "regularizer_bench", REPO / "benchmarks" / "regularizer_bench.py"
)
rb = importlib.util.module_from_spec(_spec)
sys.modules["regularizer_bench"] = rb
_spec.loader.exec_module(rb)


def _factors(d_out: int, d_in: int, r: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Float64 ``A`` (``r x d_in``), ``B`` (``d_out x r``) and an orthonormal ``U`` (``d_out x k``).

    ``B`` is half inside ``span(U)`` so that the inside energy is neither zero nor all of ``||B A||^2``.
    """
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=torch.float64))[0]
    B = U @ torch.randn(k, r, generator=gen, dtype=torch.float64) + torch.randn(
        d_out, r, generator=gen, dtype=torch.float64
    )
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    return A, B, U


def _dense(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``||U U^T B A||_F^2`` written out independently of the benchmark (projector and update materialised)."""
    return torch.linalg.matrix_norm((U @ U.mT) @ (B @ A)).square()


@pytest.mark.parametrize(("d_out", "d_in", "r", "k"), [(24, 40, 4, 6), (48, 16, 8, 32), (10, 10, 3, 10)])
def test_inside_penalty_equals_dense_formula(d_out: int, d_in: int, r: int, k: int) -> None:
    A, B, U = _factors(d_out, d_in, r, k, seed=d_out + k)
    fn = rb.penalty_fn("inside", {"U_inside": U})
    value = fn(A, B)
    assert value.dtype == torch.float64
    ref = _dense(A, B, U)
    assert 0 < float(ref) < float(torch.linalg.matrix_norm(B @ A).square()) * (1 + 1e-12)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(rb.dense_inside_loss(A, B, U), ref, rtol=1e-12, atol=0)


def test_inside_penalty_gradient_matches_dense_autograd() -> None:
    A, B, U = _factors(32, 20, 8, 5, seed=7)
    A1, B1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    rb.fwd_bwd(rb.penalty_fn("inside", {"U_inside": U}), A1, B1)
    A2, B2 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    _dense(A2, B2, U).backward()
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(B1.grad, B2.grad, rtol=1e-10, atol=1e-12)


def test_inside_penalty_is_the_packages_anchor_term() -> None:
    """The benchmark times what ``model.anchor=inside`` trains with: ``ModuleDirection.inside_energy``."""
    from asft_lightning.anchor_forms import anchor_penalty
    from asft_lightning.direction import ModuleDirection

    A, B, U = _factors(16, 12, 4, 3, seed=3)
    md = ModuleDirection("m", (16, 12), torch.tensor(1.0, dtype=torch.float64), basis=U)
    torch.testing.assert_close(
        rb.penalty_fn("inside", {"U_inside": U})(A, B), anchor_penalty("inside")(md, A, B), rtol=0, atol=0
    )
