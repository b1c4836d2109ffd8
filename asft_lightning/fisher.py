"""The empirical Fisher of the retain loss as a low-rank curvature, solved exactly by the Woodbury identity.

Pure tensor math over parameter dictionaries (``dict[str, Tensor]``). From ``N`` per-example gradients ``g_i`` of
the retain loss (rows of ``G``, ``N x P``)

    F = (1/N) sum_i g_i g_i^T = G^T G / N

is the empirical Fisher, the curvature that influence-function work uses in place of the Hessian (it is positive
semi-definite, and near a minimum of a log-likelihood it approximates the Hessian's Gauss-Newton part). Its span
is exactly the directions along which some retain example's loss changes to first order. Its damped inverse has
the closed form (Woodbury)

    (F + lam I)^{-1} g = (g - G^T (N lam I + G G^T)^{-1} G g) / lam

which costs one ``N x N`` solve, no Hessian-vector product: the restoration step ``d = (F + lam I)^{-1} g`` shrinks
the ascent direction along the retain examples' gradients and keeps it elsewhere. The damping is relative,
``lam = damping * mean eigenvalue of F`` (``trace(F) / N``), so the same setting means the same on any model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TensorDict = dict[str, Tensor]


class EmpiricalFisher:
    """``F = G^T G / N`` from per-example gradients, with its exact damped inverse and quadratic form.

    Args:
        gradients: one gradient per example, each a parameter dictionary with the same keys and shapes.
        damping: relative damping ``> 0``: ``lam = damping * trace(F) / N`` is added to the diagonal.

    Raises:
        ValueError: no gradients, differing keys or shapes, a non-finite gradient, ``damping`` not in ``(0, inf)``,
            or gradients that are all zero (then ``F = 0`` has no scale to damp against).
    """

    def __init__(self, gradients: Sequence[TensorDict], damping: float) -> None:
        if not gradients:
            raise ValueError("EmpiricalFisher: no per-example gradients")
        if not (float(damping) > 0 and torch.isfinite(torch.tensor(float(damping)))):
            raise ValueError(f"EmpiricalFisher: damping must be in (0, inf), got {damping!r}")
        self.keys = list(gradients[0])
        self.shapes = {k: gradients[0][k].shape for k in self.keys}
        for i, g in enumerate(gradients):
            if list(g) != self.keys or any(g[k].shape != self.shapes[k] for k in self.keys):
                raise ValueError(f"EmpiricalFisher: gradient {i} has other keys or shapes than gradient 0")
        self.rows = torch.stack([self._flat(g) for g in gradients])  # (N, P)
        if not torch.isfinite(self.rows).all():
            raise ValueError("EmpiricalFisher: a per-example gradient is not finite")
        self.n = self.rows.shape[0]
        gram = (self.rows.double() @ self.rows.double().T)  # G G^T, (N, N), accumulated in float64
        self.trace = float(gram.diagonal().sum()) / self.n  # trace(F)
        if self.trace <= 0:
            raise ValueError("EmpiricalFisher: every per-example gradient is zero")
        self.lam = float(damping) * self.trace / self.n
        self._chol = torch.linalg.cholesky(gram + self.n * self.lam * torch.eye(self.n, dtype=gram.dtype))

    def _flat(self, v: TensorDict) -> Tensor:
        return torch.cat([v[k].reshape(-1) for k in self.keys])

    def _unflat(self, flat: Tensor, like: TensorDict) -> TensorDict:
        out, i = {}, 0
        for k in self.keys:
            n = like[k].numel()
            out[k] = flat[i : i + n].reshape(like[k].shape).to(like[k].dtype)
            i += n
        return out

    def matvec(self, v: TensorDict) -> TensorDict:
        """``F v`` (undamped)."""
        x = self._flat(v).to(self.rows.dtype)
        return self._unflat(self.rows.T @ (self.rows @ x) / self.n, v)

    def solve(self, g: TensorDict) -> TensorDict:
        """``(F + lam I)^{-1} g``, exact (Woodbury, one Cholesky solve of ``N lam I + G G^T``)."""
        x = self._flat(g).to(self.rows.dtype)
        coeff = torch.cholesky_solve((self.rows @ x).double().unsqueeze(1), self._chol).squeeze(1)
        return self._unflat((x - self.rows.T @ coeff.to(self.rows.dtype)) / self.lam, g)

    def _parts(self, d: TensorDict) -> tuple[float, float]:
        """``d^T F d`` and ``lam d^T d``, accumulated in float64."""
        x = self._flat(d).to(self.rows.dtype)
        return float((self.rows @ x).double().square().sum() / self.n), self.lam * float(x.double().square().sum())

    def quadratic(self, d: TensorDict) -> float:
        """``d^T (F + lam I) d``."""
        return sum(self._parts(d))

    def task_share(self, d: TensorDict) -> float:
        """``d^T F d / d^T (F + lam I) d``: the share of the step's quadratic form that the retain examples see."""
        fisher, damped = self._parts(d)
        return fisher / (fisher + damped) if fisher + damped > 0 else 0.0
