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


def test_step_report_names_the_inside_rank_it_ran_with() -> None:
    """``--inside_k 8`` (the ``harm_subspace`` anchor's size): the step report's table and targets carry that ``k``
    and the ratio of the measured medians, not the default 32."""
    times = {"lam1": [1.0, 1.1], "inside": [1.02, 1.04], "lam0": [1.0, 1.0], "none": [0.98, 1.0]}
    med = {k: sum(v) / 2 for k, v in times.items()}
    res = {
        "times": times, "median": med, "min": {k: min(v) for k, v in times.items()}, "cpu_median": dict(med),
        "isolated": {"with_grad": 0.01, "inside_with_grad": 0.005, "value_only": 0.002},
        "batch": 4, "seq": 128, "final_drift": 0.9, "final_penalty": 1e-3, "final_penalty_inside": 2e-4,
        "inside_k": 8, "inside_ranks": [8], "lora_modules": 60, "trainable": 460800,
        "paired_inside_lam0": 1.03, "paired_inside_none": 1.04, "paired_lam0_none": 1.01, "paired_lam1_lam0": 1.05,
        "paired_lam1_none": 1.06,
    }
    lines, targets = rb.step_report(res, {"layers": 30, "params": 134.5e6})
    text = "\n".join(lines)
    assert "anchor=inside (k=8)" in text and "rank=8, reference='base'" in text and "k=32" not in text
    inside = {name: (measured, met) for name, _, measured, met in targets if "anchor=inside" in name}
    assert set(inside) == {
        "AsFTModule step time anchor=inside (k=8) lam=1 / lam=0 (wall clock, ratio of medians)",
        "AsFTModule step CPU time anchor=inside (k=8) lam=1 / lam=0 (ratio of medians)",
        "AsFTModule step time anchor=inside (k=8) lam=1 / no direction (plain LoRA)",
    }
    wall = inside["AsFTModule step time anchor=inside (k=8) lam=1 / lam=0 (wall clock, ratio of medians)"]
    assert wall == (f"{1.03 / 1.0:.4f}", True)
    assert inside["AsFTModule step time anchor=inside (k=8) lam=1 / no direction (plain LoRA)"][0] == f"{1.03 / 0.99:.4f}"


@pytest.mark.parametrize("k", ["0", "33"])
def test_inside_k_outside_the_synthetic_alignment_rank_is_refused(k: str, capsys) -> None:
    """A basis the rank-32 synthetic alignment cannot fill would be capped silently: refused before any work."""
    with pytest.raises(SystemExit) as e:
        rb.main(["--inside_k", k, "--skip", "penalty,step"])
    assert e.value.code == 2
    assert f"--inside_k must be in [1, 32] (the synthetic alignment's rank), got {k}" in capsys.readouterr().err
