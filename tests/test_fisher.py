"""The empirical Fisher solver against dense float64 linear algebra."""

from __future__ import annotations

import pytest
import torch

from asft_lightning.fisher import EmpiricalFisher


def _grads(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
             "b": torch.randn(5, generator=gen, dtype=torch.float64)} for _ in range(n)]


def _flat(v: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v["a"].reshape(-1), v["b"]])


def _dense(grads: list[dict[str, torch.Tensor]], damping: float) -> tuple[torch.Tensor, float]:
    rows = torch.stack([_flat(g) for g in grads])
    fisher = rows.T @ rows / len(grads)
    lam = damping * float(torch.trace(fisher)) / len(grads)
    return fisher, lam


@pytest.mark.parametrize("n", [1, 4, 30])  # fewer, and more, examples than the 17 parameters
@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
def test_solve_matvec_and_quadratic_equal_dense_formulas_in_float64(n, damping):
    grads = _grads(n)
    fisher, lam = _dense(grads, damping)
    f = EmpiricalFisher(grads, damping)
    assert f.lam == pytest.approx(lam, rel=1e-12)
    g = _grads(1, seed=9)[0]
    x = _flat(g)
    dense_solve = torch.linalg.solve(fisher + lam * torch.eye(17, dtype=torch.float64), x)
    torch.testing.assert_close(_flat(f.solve(g)), dense_solve, rtol=1e-9, atol=1e-10 * float(dense_solve.abs().max()))
    torch.testing.assert_close(_flat(f.matvec(g)), fisher @ x, rtol=1e-12, atol=1e-12)
    quad = float(x @ (fisher + lam * torch.eye(17, dtype=torch.float64)) @ x)
    assert f.quadratic(g) == pytest.approx(quad, rel=1e-12)
    assert f.task_share(g) == pytest.approx(float(x @ fisher @ x) / quad, rel=1e-12)
    assert f.solve(g)["a"].shape == (3, 4) and f.solve(g)["a"].dtype == torch.float64


def test_solve_shrinks_the_examples_directions_and_keeps_the_others():
    """Along a retain gradient the step shrinks; orthogonal to every retain gradient it is g / lam exactly."""
    grads = [{"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.eye(5, dtype=torch.float64)[i]} for i in range(2)]
    f = EmpiricalFisher(grads, damping=0.01)
    along = {"a": torch.zeros(3, 4, dtype=torch.float64), "b": torch.eye(5, dtype=torch.float64)[0]}
    away = {"a": torch.ones(3, 4, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    torch.testing.assert_close(_flat(f.solve(away)), _flat(away) / f.lam)
    # eigenvalue of F along e_0 is 1/2: (1/2 + lam)^{-1}, much less than 1/lam
    assert float(f.solve(along)["b"][0]) == pytest.approx(1 / (0.5 + f.lam), rel=1e-12)
    assert f.task_share(away) == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no per-example gradients"):
        EmpiricalFisher([], 0.1)
    with pytest.raises(ValueError, match="damping"):
        EmpiricalFisher(_grads(2), float("nan"))
    with pytest.raises(ValueError, match="damping"):
        EmpiricalFisher(_grads(2), 0.0)
    with pytest.raises(ValueError, match="gradient 1 has other keys or shapes"):
        EmpiricalFisher([_grads(1)[0], {"a": torch.zeros(3, 4, dtype=torch.float64)}], 0.1)
    with pytest.raises(ValueError, match="not finite"):
        EmpiricalFisher([{"a": torch.tensor([float("inf")])}], 0.1)
    with pytest.raises(ValueError, match="all zero|every per-example gradient is zero"):
        EmpiricalFisher([{"a": torch.zeros(3)}], 0.1)
