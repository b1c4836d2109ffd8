"""Float64 parity of the AsFT regulariser math (values and gradients) against dense references.

The references build every matrix explicitly (``C = V V^T / ||V||_F``, ``(I - C) @ (B @ A)``, ...), which the
implementation never does.
"""

from __future__ import annotations

import pytest
import torch

from asft_lightning import regularizers as R
from asft_lightning.direction import ModuleDirection

F64 = torch.float64
# (d_out, d_in, r): square, tall, wide, r = 1, r > min(d_out, d_in) is not LoRA-like but still valid math.
SHAPES = [(8, 8, 2), (12, 7, 3), (5, 9, 1), (16, 32, 4), (6, 4, 1)]
RTOL = 1e-10


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative closeness; the absolute floor scales with the size of the expected values."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-300))


def _factors(d_out: int, d_in: int, r: int, seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d_in, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    b = torch.randn(d_out, r, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    v = torch.randn(d_out, d_in, generator=g, dtype=F64).to(dtype)
    return a, b, v


def _basis(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    return u[:, :k].contiguous(), s


# ---------------------------------------------------------------- dense references


def dense_C(v: torch.Tensor) -> torch.Tensor:
    return v @ v.mT / torch.linalg.matrix_norm(v)


def dense_lowrank_C(u: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    w = torch.ones(u.shape[1], dtype=u.dtype) if w is None else w
    return u @ torch.diag(w) @ u.mT


def dense_penalty(a, b, c):
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.matrix_norm((eye - c) @ (b @ a)) ** 2


def dense_alignment(a, b, v):
    return ((b @ a) * v).sum() / torch.linalg.matrix_norm(v)


def dense_sign_aware(a, b, v):
    return torch.clamp(-dense_alignment(a, b, v), min=0) ** 2


def dense_energy(a, b):
    return torch.linalg.matrix_norm(b @ a) ** 2


def _check_value_and_grads(fn, ref, a, b, rtol=RTOL):
    """``fn(a, b)`` and ``ref(a, b)`` agree, and so do their gradients w.r.t. ``a`` and ``b``."""
    out, expected = fn(a, b), ref(a, b)
    assert out.shape == () and out.dtype == expected.dtype
    _close(out, expected, rtol)
    ga, gb = torch.autograd.grad(out, (a, b))
    ra, rb = torch.autograd.grad(expected, (a, b))
    _close(ga, ra, rtol)
    _close(gb, rb, rtol)


# ---------------------------------------------------------------- parity: values and gradients


@pytest.mark.parametrize("shape", SHAPES)
def test_asft_penalty_matches_dense(shape):
    a, b, v = _factors(*shape, seed=1)
    c = dense_C(v)
    _check_value_and_grads(lambda a, b: R.asft_penalty(a, b, v), lambda a, b: dense_penalty(a, b, c), a, b)
    norm = torch.linalg.vector_norm(v)
    _check_value_and_grads(
        lambda a, b: R.asft_penalty(a, b, v, direction_norm=norm), lambda a, b: dense_penalty(a, b, c), a, b
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_safelora_apply_matches_dense(shape):
    _, b, v = _factors(*shape, seed=2)
    _close(R.safelora_apply(b.detach(), v), dense_C(v) @ b.detach())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_subspace_penalty_matches_dense(shape, k):
    a, b, v = _factors(*shape, seed=3)
    u, _ = _basis(v, min(k, min(shape[:2])))
    c = u @ u.mT
    _check_value_and_grads(
        lambda a, b: R.subspace_penalty(a, b, u), lambda a, b: dense_penalty(a, b, c), a, b
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_lowrank_penalty_matches_dense(shape, weighted):
    a, b, v = _factors(*shape, seed=4)
    k = min(2, min(shape[:2]))
    u, s = _basis(v, k)
    w = (s[:k] ** 2 / torch.linalg.matrix_norm(v)) if weighted else None
    c = dense_lowrank_C(u, w)
    _check_value_and_grads(
        lambda a, b: R.lowrank_penalty(a, b, u, w), lambda a, b: dense_penalty(a, b, c), a, b
    )
    _close(R.lowrank_apply(b.detach(), u, w), c @ b.detach())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_update_alignment_and_sign_aware_match_dense(shape, sign):
    a, b, v = _factors(*shape, seed=5)
    v = sign * v
    _check_value_and_grads(
        lambda a, b: R.update_alignment(a, b, v), lambda a, b: dense_alignment(a, b, v), a, b
    )
    align = float(dense_alignment(a, b, v).detach())
    # Make sure both branches of the relu are exercised: flip V so that the update opposes it.
    if align > 0:
        v = -v
    _check_value_and_grads(
        lambda a, b: R.sign_aware_penalty(a, b, v), lambda a, b: dense_sign_aware(a, b, v), a, b
    )
    assert float(R.sign_aware_penalty(a, b, v).detach()) > 0
    # With the update along V the penalty and its gradients are exactly zero.
    out = R.sign_aware_penalty(a, b, -v)
    assert out.item() == 0.0
    ga, gb = torch.autograd.grad(out, (a, b))
    assert not ga.any() and not gb.any()


@pytest.mark.parametrize("shape", SHAPES)
def test_update_energy_and_frobenius_of_product_match_dense(shape):
    a, b, _ = _factors(*shape, seed=6)
    _check_value_and_grads(R.update_energy, dense_energy, a, b)
    _close(R.frobenius_of_product(b, a), torch.linalg.matrix_norm(b @ a) ** 2)


# ---------------------------------------------------------------- structural properties


@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_safelora_at_full_rank_equals_full_form(shape):
    """``C = V V^T / ||V||`` is exactly ``U diag(s^2 / ||V||) U^T`` with all of V's singular vectors."""
    a, b, v = _factors(*shape, seed=7)
    u, s = _basis(v, min(shape[:2]))
    w = s**2 / torch.linalg.vector_norm(v)
    _check_value_and_grads(
        lambda a, b: R.lowrank_penalty(a, b, u, w), lambda a, b: R.asft_penalty(a, b, v), a, b, rtol=1e-9
    )
    _close(R.lowrank_apply(b.detach(), u, w), R.safelora_apply(b.detach(), v), rtol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_B_gives_exact_zero(shape):
    a, b, v = _factors(*shape, seed=8)
    zero = torch.zeros_like(b)
    u, s = _basis(v, 1)
    w = s[:1] ** 2 / torch.linalg.vector_norm(v)
    for value in (
        R.asft_penalty(a, zero, v),
        R.subspace_penalty(a, zero, u),
        R.lowrank_penalty(a, zero, u, w),
        R.update_energy(a, zero),
        R.update_alignment(a, zero, v),
        R.sign_aware_penalty(a, zero, v),
    ):
        assert value.item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_subspace_drift_ratio_in_unit_interval(shape, seed):
    a, b, v = (t.detach() for t in _factors(*shape, seed=100 + seed))
    k = max(1, min(shape[:2]) // 2)
    u, _ = _basis(v, k)
    ratio = torch.sqrt(R.subspace_penalty(a, b, u) / R.update_energy(a, b))
    assert 0.0 <= float(ratio) <= 1.0
    # The extremes: an update inside span(U) has ratio 0, one orthogonal to it ratio 1.
    inside = u @ torch.randn(k, b.shape[1], dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert float(R.subspace_penalty(a, inside, u) / R.update_energy(a, inside)) < 1e-24
    if k < shape[0]:
        outside = torch.randn(b.shape, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
        outside = outside - u @ (u.mT @ outside)
        _close(R.subspace_penalty(a, outside, u), R.update_energy(a, outside))


def test_published_projector_is_not_idempotent():
    """A reminder of what the published ``C`` is: eigenvalues ``sigma_i^2 / ||V||_F``, not 1."""
    _, _, v = _factors(10, 6, 1, seed=9)
    c = dense_C(v)
    s = torch.linalg.svdvals(v)
    eig = torch.linalg.eigvalsh(c).flip(0)[: s.numel()]
    _close(eig, s**2 / torch.linalg.matrix_norm(v), rtol=1e-9)
    assert not torch.allclose(c @ c, c)


def test_no_dense_d_out_matrix_is_built():
    """With ``d_out = 100_000`` a ``d_out x d_out`` float64 matrix would need 80 GB; the Gram forms need kilobytes."""
    d_out, d_in, r, k = 100_000, 4, 2, 3
    g = torch.Generator().manual_seed(10)
    a = torch.randn(r, d_in, generator=g, dtype=F64)
    b = torch.randn(d_out, r, generator=g, dtype=F64)
    v = torch.randn(d_out, d_in, generator=g, dtype=F64)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=F64)).Q
    for value in (
        R.asft_penalty(a, b, v),
        R.subspace_penalty(a, b, u),
        R.lowrank_penalty(a, b, u, torch.ones(k, dtype=F64)),
        R.update_alignment(a, b, v),
    ):
        assert torch.isfinite(value)
    # Same value through the (d_in x d_in) dual of the dense form: ||(I - C) B A||^2 = ||BA||^2 - 2<CBA,BA> + ||CBA||^2.
    ba_energy = R.update_energy(a, b)
    cb = R.safelora_apply(b, v)
    cross = ((b.mT @ cb) * (a @ a.mT)).sum()
    _close(R.asft_penalty(a, b, v), ba_energy - 2 * cross + R.frobenius_of_product(cb, a), rtol=1e-9)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    a, b, v = _factors(12, 7, 3, seed=11, dtype=dtype)
    u, s = _basis(v, 2)
    w = s[:2] ** 2 / torch.linalg.vector_norm(v)
    outs = {
        "asft_penalty": R.asft_penalty(a, b, v),
        "subspace_penalty": R.subspace_penalty(a, b, u),
        "lowrank_penalty": R.lowrank_penalty(a, b, u, w),
        "update_alignment": R.update_alignment(a, b, v),
        "sign_aware_penalty": R.sign_aware_penalty(a, b, -v if R.update_alignment(a, b, v) > 0 else v),
        "update_energy": R.update_energy(a, b),
        "safelora_apply": R.safelora_apply(b, v),
        "lowrank_apply": R.lowrank_apply(b, u, w),
    }
    for name, out in outs.items():
        assert out.dtype == dtype, name
    if dtype == torch.float32:
        a64, b64, v64 = (t.detach().double() for t in (a, b, v))
        ref = dense_penalty(a64, b64, dense_C(v64))
        torch.testing.assert_close(outs["asft_penalty"].double(), ref, rtol=1e-4, atol=1e-4 * float(ref))


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_is_the_factors_dtype_for_any_direction_dtype(factor_dtype, direction_dtype):
    a, b, v = _factors(8, 6, 2, seed=12, dtype=factor_dtype)
    u, s = _basis(v.double(), 2)
    v_d, u_d, w_d = v.to(direction_dtype), u.to(direction_dtype), (s[:2] ** 2).to(direction_dtype)
    for out in (
        R.asft_penalty(a, b, v_d),
        R.lowrank_penalty(a, b, u_d, w_d),
        R.subspace_penalty(a, b, u_d),
        R.update_alignment(a, b, v_d),
        R.safelora_apply(b, v_d),
        R.lowrank_apply(b, u_d, w_d),
    ):
        assert out.dtype == factor_dtype
        assert torch.isfinite(out).all()


# ---------------------------------------------------------------- ModuleDirection, every stored form


def _module_forms(v: torch.Tensor, k: int) -> dict[str, tuple[ModuleDirection, torch.Tensor]]:
    """The three forms a direction file stores, each with its dense ``C``."""
    norm = torch.linalg.vector_norm(v)
    u, s = _basis(v, k)
    w = s[:k] ** 2 / norm
    shape = tuple(v.shape)
    return {
        "safelora": (ModuleDirection("m", shape, norm, direction=v), dense_C(v)),
        "safelora_lowrank": (ModuleDirection("m", shape, norm, basis=u, weights=w), dense_lowrank_C(u, w)),
        "subspace": (ModuleDirection("m", shape, norm, basis=u), u @ u.mT),
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["safelora", "safelora_lowrank", "subspace"])
def test_module_direction_penalty_each_form(shape, form):
    a, b, v = _factors(*shape, seed=13)
    md, c = _module_forms(v, min(2, min(shape[:2])))[form]
    _check_value_and_grads(md.penalty, lambda a, b: dense_penalty(a, b, c), a, b)
    _close(md.apply(b.detach()), c @ b.detach())


def test_module_direction_full_rank_lowrank_form_equals_full_form():
    a, b, v = _factors(12, 7, 3, seed=14)
    forms = _module_forms(v, 7)
    _close(forms["safelora_lowrank"][0].penalty(a, b), forms["safelora"][0].penalty(a, b), rtol=1e-9)


def test_module_direction_to_changes_dtype_and_keeps_values():
    a, b, v = _factors(8, 6, 2, seed=15)
    for md, _ in _module_forms(v, 2).values():
        md32 = md.to("cpu", torch.float32)
        for name in ("norm", "direction", "basis", "weights"):
            t, t32 = getattr(md, name), getattr(md32, name)
            assert (t is None) == (t32 is None)
            if t is not None:
                assert t32.dtype == torch.float32
                torch.testing.assert_close(t32.double(), t, rtol=1e-6, atol=1e-7)
        assert md32.shape == md.shape and md32.name == md.name
        out = md32.penalty(a.detach().float(), b.detach().float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), md.penalty(a, b).detach(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- candidate anchors (issue 13): dense references


def dense_normalized_C(v: torch.Tensor) -> torch.Tensor:
    """``V V^T / sigma_1^2``: the published C divided by its top eigenvalue."""
    return v @ v.mT / torch.linalg.matrix_norm(v, ord=2) ** 2


def dense_inside(a, b, u):
    return torch.linalg.matrix_norm(u @ u.mT @ (b @ a)) ** 2


def dense_coordinates(a, b, u, vr):
    dw = b @ a
    return torch.stack([u[:, i] @ dw @ vr[:, i] for i in range(u.shape[1])])


def dense_component_sign(a, b, u, vr):
    return (torch.clamp(-dense_coordinates(a, b, u, vr), min=0) ** 2).sum()


def _svd_k(v: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    return u[:, :k].contiguous(), vh[:k].mT.contiguous(), s


@pytest.mark.parametrize("shape", SHAPES)
def test_normalized_penalty_matches_dense(shape):
    a, b, v = _factors(*shape, seed=20)
    sigma1 = torch.linalg.matrix_norm(v, ord=2)
    c = dense_normalized_C(v)
    _check_value_and_grads(
        lambda a, b: R.normalized_penalty(a, b, v, sigma1), lambda a, b: dense_penalty(a, b, c), a, b
    )
    _close(R.normalized_apply(b.detach(), v, sigma1), c @ b.detach())
    # C_n's top eigenvalue is 1, the rest sigma_i^2 / sigma_1^2
    eig = torch.linalg.eigvalsh(c).flip(0)
    _close(eig[0], torch.tensor(1.0, dtype=F64), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_normalized_penalty_does_not_depend_on_the_size_of_V(shape):
    """Scaling V by any factor leaves the normalised penalty unchanged; the published one changes."""
    a, b, v = (t.detach() for t in _factors(*shape, seed=21))
    sigma1 = torch.linalg.matrix_norm(v, ord=2)
    base = R.normalized_penalty(a, b, v, sigma1)
    for scale in (1e-3, 0.05, 7.0, 1e4):
        _close(R.normalized_penalty(a, b, scale * v, scale * sigma1), base, rtol=1e-11)
    assert not torch.allclose(R.asft_penalty(a, b, 0.05 * v), R.asft_penalty(a, b, 7.0 * v))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2])
def test_inside_energy_matches_dense_and_complements_subspace(shape, k):
    a, b, v = _factors(*shape, seed=22)
    u, _, _ = _svd_k(v, min(k, min(shape[:2])))
    _check_value_and_grads(lambda a, b: R.inside_energy(a, b, u), lambda a, b: dense_inside(a, b, u), a, b)
    # inside + outside = all of the update's energy (U orthonormal)
    _close(
        R.inside_energy(a, b, u) + R.subspace_penalty(a, b, u), R.update_energy(a, b), rtol=1e-10
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
def test_component_coordinates_and_sign_penalty_match_dense(shape, k):
    a, b, v = _factors(*shape, seed=23)
    k = min(k, min(shape[:2]))
    u, vr, _ = _svd_k(v, k)
    coords = R.component_coordinates(a, b, u, vr)
    assert coords.shape == (k,)
    _close(coords, dense_coordinates(a, b, u, vr))
    ga = torch.autograd.grad(coords.sum(), a)[0]
    ra = torch.autograd.grad(dense_coordinates(a, b, u, vr).sum(), a)[0]
    _close(ga, ra)
    _check_value_and_grads(
        lambda a, b: R.component_sign_penalty(a, b, u, vr), lambda a, b: dense_component_sign(a, b, u, vr), a, b
    )


def test_component_sign_penalty_sees_each_component_where_the_whole_V_term_does_not():
    """An update that undoes component 2 while adding more of component 1: the whole-V sign term is 0 (the update's
    alignment with V is positive), the per-component term is relu(-c_2)^2 with exactly c_2's gradient."""
    g = torch.Generator().manual_seed(24)
    d_out, d_in = 9, 7
    u = torch.linalg.qr(torch.randn(d_out, 3, generator=g, dtype=F64)).Q
    vr = torch.linalg.qr(torch.randn(d_in, 3, generator=g, dtype=F64)).Q
    v = u @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64)) @ vr.mT
    # dW = 2 u1 v1^T - 1 u2 v2^T as B A with r = 2
    b = torch.stack([u[:, 0], u[:, 1]], 1).requires_grad_(True)
    a = torch.stack([2 * vr[:, 0], -vr[:, 1]], 0).requires_grad_(True)
    assert float(R.update_alignment(a, b, v).detach()) > 0
    assert float(R.sign_aware_penalty(a, b, v).detach()) == 0.0
    coords = R.component_coordinates(a, b, u, vr)
    _close(coords, torch.tensor([2.0, -1.0, 0.0], dtype=F64))
    pen = R.component_sign_penalty(a, b, u, vr)
    _close(pen, torch.tensor(1.0, dtype=F64))
    _check_value_and_grads(
        lambda a, b: R.component_sign_penalty(a, b, u, vr), lambda a, b: dense_component_sign(a, b, u, vr), a, b
    )
    # moving with every component: zero, zero gradients, up to float64 rounding (the third coordinate is ~1e-33,
    # not exactly 0, and its sign depends on the summation order, e.g. the thread count: relu(-c)^2 <= 1e-65)
    a_with = torch.stack([2 * vr[:, 0], vr[:, 1]], 0).requires_grad_(True)
    out = R.component_sign_penalty(a_with, b, u, vr)
    assert 0.0 <= out.item() < 1e-60
    ga, gb = torch.autograd.grad(out, (a_with, b))
    assert float(ga.abs().max()) < 1e-28 and float(gb.abs().max()) < 1e-28
    # unit components: the term does not change when V is scaled (U, V_r are V's, whatever its size)
    u2, vr2, _ = _svd_k(1e-3 * v, 3)
    signs = torch.sign((u2 * u).sum(0))  # an SVD fixes each pair only up to a joint sign
    _close(R.component_sign_penalty(a, b, u2 * signs, vr2 * signs), pen, rtol=1e-10)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction_dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_new_forms_keep_the_factors_dtype(factor_dtype, direction_dtype):
    a, b, v = _factors(8, 6, 2, seed=25, dtype=factor_dtype)
    u, vr, s = _svd_k(v.double(), 2)
    v_d, u_d, vr_d, s1 = v.to(direction_dtype), u.to(direction_dtype), vr.to(direction_dtype), s[0].to(direction_dtype)
    for out in (
        R.normalized_penalty(a, b, v_d, s1),
        R.normalized_apply(b, v_d, s1),
        R.inside_energy(a, b, u_d),
        R.component_coordinates(a, b, u_d, vr_d),
        R.component_sign_penalty(a, b, u_d, vr_d),
    ):
        assert out.dtype == factor_dtype
        assert torch.isfinite(out).all()


def test_new_forms_build_no_dense_d_out_matrix():
    d_out, d_in, r, k = 100_000, 4, 2, 3
    g = torch.Generator().manual_seed(26)
    a = torch.randn(r, d_in, generator=g, dtype=F64)
    b = torch.randn(d_out, r, generator=g, dtype=F64)
    v = torch.randn(d_out, d_in, generator=g, dtype=F64)
    u = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=F64)).Q
    vr = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=F64)).Q
    sigma1 = torch.linalg.matrix_norm(v, ord=2)
    for value in (
        R.normalized_penalty(a, b, v, sigma1),
        R.inside_energy(a, b, u),
        R.component_sign_penalty(a, b, u, vr),
    ):
        assert torch.isfinite(value)


# ---------------------------------------------------------------- ModuleDirection: the new forms on every stored form


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["safelora", "safelora_lowrank", "subspace"])
def test_module_direction_normalized_penalty_each_form(shape, form):
    a, b, v = _factors(*shape, seed=27)
    k = min(2, min(shape[:2]))
    md, c = _module_forms(v, k)[form]
    if form == "safelora":
        md.singular = torch.linalg.svdvals(v)
        c_n = dense_normalized_C(v)
    else:
        c_n = c / torch.linalg.eigvalsh(c).max()
    _check_value_and_grads(md.normalized_penalty, lambda a, b: dense_penalty(a, b, c_n), a, b)


def test_module_direction_top_singular_value_without_stored_singular_values():
    """Files written before ``<name>.singular`` existed: sigma_1 from the eigenpairs, or computed from V once."""
    _, _, v = _factors(12, 7, 3, seed=28)
    s1 = torch.linalg.matrix_norm(v, ord=2)
    forms = _module_forms(v, 2)
    full, eig = forms["safelora"][0], forms["safelora_lowrank"][0]
    assert full.singular is None
    _close(full.top_singular_value(), s1)
    assert full.singular is not None  # kept
    _close(eig.top_singular_value(), s1)


@pytest.mark.parametrize("shape", SHAPES)
def test_module_direction_inside_energy_and_component_sign(shape):
    a, b, v = _factors(*shape, seed=29)
    k = min(3, min(shape[:2]))
    u, vr, s = _svd_k(v, k)
    md = ModuleDirection("m", tuple(v.shape), torch.linalg.vector_norm(v), basis=u, right=vr, singular=s)
    assert md.kind == "subspace"
    _check_value_and_grads(md.inside_energy, lambda a, b: dense_inside(a, b, u), a, b)
    _check_value_and_grads(md.component_sign_penalty, lambda a, b: dense_component_sign(a, b, u, vr), a, b)
    moved = md.to("cpu", torch.float32)
    assert moved.right.dtype == torch.float32 and moved.singular.dtype == torch.float32
    assert moved.kind == "subspace"
