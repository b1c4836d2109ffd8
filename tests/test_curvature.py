"""Curvature primitives against dense float64 references (curvlinops style).

Every HVP method is checked against ``torch.func.hessian`` of the same function on a flat parameter vector,
both for an analytic toy function and for the LoRA factors of the tiny Llama; the solvers are checked against
``torch.linalg.solve``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from asft_lightning import curvature as cv
from asft_lightning.curvature import (
    LBFGSHistory,
    NondeterministicLossError,
    causal_lm_loss,
    check_second_order,
    conjugate_gradient,
    flatten,
    functional_loss,
    hvp,
    inplace_grad_fn,
    lbfgs_inverse,
    params_of,
    second_order_attention,
    unflatten,
)

EXACT = ("double_backward", "forward_over_reverse")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for these tiny float64 ops: 10-100x faster than two threads when another process
    shares the two cores (measured), and no slower when idle. Restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _dense_hessian(loss_fn, params: dict[str, torch.Tensor]) -> torch.Tensor:
    flat = flatten(params).detach()
    return torch.func.hessian(lambda x: loss_fn(unflatten(x, params)))(flat)


# ------------------------------------------------------------------------------------------------------------
# toy analytic function: cubic + log-sum-exp + a cross term, two parameter tensors
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(7, 17, generator=gen, dtype=torch.float64)
    params = {
        "a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(5, generator=gen, dtype=torch.float64),
    }

    def loss_fn(p):
        x = torch.cat([p["a"].reshape(-1), p["b"]])
        return torch.logsumexp(m @ x, 0) + (x**3).sum() / 6 + torch.sin(p["a"].sum() * p["b"]).sum()

    vector = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
    dense = _dense_hessian(loss_fn, params)
    return loss_fn, params, vector, dense


def test_vector_helpers_on_dicts_and_tensors():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[3.0]])}
    b = {"x": torch.tensor([0.5, -1.0]), "y": torch.tensor([[2.0]])}
    assert float(cv.dot(a, b)) == pytest.approx(0.5 - 2 + 6)
    assert float(cv.norm(a)) == pytest.approx(math.sqrt(14))
    torch.testing.assert_close(flatten(cv.axpy(2.0, a, b)), torch.tensor([2.5, 3.0, 8.0]))
    torch.testing.assert_close(flatten(cv.add(a, b)), torch.tensor([1.5, 1.0, 5.0]))
    torch.testing.assert_close(flatten(cv.sub(a, b)), torch.tensor([0.5, 3.0, 1.0]))
    torch.testing.assert_close(flatten(cv.scale(a, -1.0)), -flatten(a))
    torch.testing.assert_close(cv.axpy(3.0, torch.ones(2), torch.ones(2)), torch.full((2,), 4.0))
    assert (
        cv.dot(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)).dtype
        == torch.float32
    )
    back = unflatten(flatten(a), a)
    assert all(torch.equal(back[k], a[k]) for k in a)
    with pytest.raises(ValueError, match="different keys"):
        cv.dot(a, {"x": b["x"]})


@pytest.mark.parametrize("method", [*EXACT, "auto"])
def test_exact_hvp_matches_dense_hessian_toy(toy, method):
    loss_fn, params, vector, dense = toy
    hv = hvp(loss_fn, params, vector, method=method)
    assert hv.keys() == params.keys() and all(hv[k].shape == params[k].shape for k in params)
    assert _rel(flatten(hv), dense @ flatten(vector)) < 1e-12


def test_finite_difference_hvp_is_second_order_accurate_toy(toy):
    loss_fn, params, vector, dense = toy
    exact = dense @ flatten(vector)
    # Default step (cube-root rule): close to the exact product in float64.
    assert _rel(flatten(hvp(loss_fn, params, vector, method="finite_difference")), exact) < 1e-8
    # Truncation regime: halving eps divides the error by ~4 (O(eps^2)).
    steps = (1e-2, 5e-3, 2.5e-3)
    errors = [_rel(flatten(hvp(loss_fn, params, vector, "finite_difference", eps=e)), exact) for e in steps]
    for big, small in zip(errors[:-1], errors[1:], strict=True):
        assert 3.6 < big / small < 4.4, errors
    assert errors[-1] < 1e-3
    # The default step follows the cube-root rule of the (compute) dtype.
    step64 = cv.default_fd_eps(params, vector)
    assert step64 == pytest.approx(
        torch.finfo(torch.float64).eps ** (1 / 3) * (1 + float(cv.norm(params))) / float(cv.norm(vector))
    )
    assert cv.default_fd_eps(params, vector, dtype=torch.bfloat16) / step64 == pytest.approx(
        (torch.finfo(torch.bfloat16).eps / torch.finfo(torch.float64).eps) ** (1 / 3)
    )


def test_hvp_zero_vector_independent_params_and_hooks(toy):
    loss_fn, params, vector, dense = toy
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    for method in ("double_backward", "finite_difference"):
        assert float(cv.norm(hvp(loss_fn, params, zero, method=method))) == 0.0
    # A parameter the loss ignores gets zeros; a linear loss has H = 0.
    extra = {**params, "unused": torch.ones(2, dtype=torch.float64)}
    vec = {**vector, "unused": torch.ones(2, dtype=torch.float64)}
    hv = hvp(loss_fn, extra, vec, method="double_backward")
    assert torch.equal(hv["unused"], torch.zeros(2, dtype=torch.float64))
    linear = hvp(lambda p: p["a"].sum() * 3, params, vector, method="double_backward")
    assert float(cv.norm(linear)) == 0.0
    # all_reduce is applied once to each output tensor (e.g. a mean over ranks).
    calls = []

    def fake_all_reduce(t):
        calls.append(t.shape)
        return t * 2

    reduced = hvp(loss_fn, params, vector, method="double_backward", all_reduce=fake_all_reduce)
    assert len(calls) == len(params)
    torch.testing.assert_close(flatten(reduced), 2 * dense @ flatten(vector))


def test_hvp_validates_inputs(toy):
    loss_fn, params, vector, _ = toy
    with pytest.raises(ValueError, match="method must be one of"):
        hvp(loss_fn, params, vector, method="newton")
    with pytest.raises(ValueError, match="different keys"):
        hvp(loss_fn, params, {"a": vector["a"]})
    with pytest.raises(ValueError, match="differ in shape"):
        hvp(loss_fn, params, {"a": vector["a"].T, "b": vector["b"]})
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda p: p["a"] ** 2, params, vector, method="double_backward")
    with pytest.raises(ValueError, match="eps must be"):
        hvp(loss_fn, params, vector, method="finite_difference", eps=-1.0)
    with pytest.raises(ValueError, match="grad_fn"):
        hvp(None, params, vector, method="double_backward")


# ------------------------------------------------------------------------------------------------------------
# the tiny Llama's LoRA factors, float64
# ------------------------------------------------------------------------------------------------------------


def _eager_attention_native_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention without its float32 softmax upcast, so float64 stays float64 end to end."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _rms_norm_native_dtype(self, hidden_states):
    """HF's LlamaRMSNorm without its float32 upcast."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def float64_eager():
    """HF Llama computes its eager-attention softmax and its RMSNorm in float32 even in a float64 model, which
    limits parity to ~1e-8; swap in native-dtype versions for this module's tests (restored afterwards)."""
    from transformers.models.llama import modeling_llama

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama, "eager_attention_forward", _eager_attention_native_dtype)
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_native_dtype)
        yield


def _lora_model(path: str, attn: str = "eager", dropout: float = 0.0, lora_values=None):
    """r=2 LoRA on layer 0's q_proj only: 2 * (2*32 + 32*2) = 128 parameters, float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation=attn)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[0], lora_dropout=dropout
    )
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora_values is not None and name in lora_values:
                p.copy_(lora_values[name])
            elif "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@pytest.fixture(scope="module")
def lora(tiny_world, float64_eager):
    model = _lora_model(tiny_world["aligned"])
    ids = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    params = params_of(model, "lora_", clone=True)
    assert sum(p.numel() for p in params.values()) == 128

    def make_loss(m):
        return functional_loss(
            m, lambda out: causal_lm_loss(out.logits, ids), kwargs={"input_ids": ids, "use_cache": False}
        )

    loss_fn = make_loss(model)
    dense = _dense_hessian(loss_fn, params)
    gen = torch.Generator().manual_seed(2)
    vector = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
    return {
        "model": model, "ids": ids, "params": params, "loss_fn": loss_fn, "make_loss": make_loss,
        "dense": dense, "vector": vector, "exact": dense @ flatten(vector),
    }  # fmt: skip


def test_params_of_selects_lora_and_shares_storage(lora):
    model = lora["model"]
    by_grad = params_of(model)
    assert list(by_grad) == list(lora["params"]) and all("lora_" in k for k in by_grad)
    name = next(iter(by_grad))
    assert by_grad[name].data_ptr() == dict(model.named_parameters())[name].data_ptr()
    assert not by_grad[name].requires_grad
    assert list(params_of(model, lambda n, p: "lora_A" in n)) == [name]
    with pytest.raises(ValueError, match="no parameter"):
        params_of(model, "no_such_name")
    with pytest.raises(ValueError, match="not parameters"):
        lora["loss_fn"]({"nope": torch.zeros(1)})


@pytest.mark.parametrize("method", [*EXACT, "auto"])
def test_exact_hvp_matches_dense_hessian_lora(lora, method):
    hv = hvp(lora["loss_fn"], lora["params"], lora["vector"], method=method)
    assert _rel(flatten(hv), lora["exact"]) < 1e-9
    assert lora["dense"].abs().max() > 1e-3  # a real, non-trivial Hessian


def test_finite_difference_hvp_lora(lora):
    loss_fn, params, vector, exact = lora["loss_fn"], lora["params"], lora["vector"], lora["exact"]
    assert _rel(flatten(hvp(loss_fn, params, vector, method="finite_difference")), exact) < 1e-6
    errors = [
        _rel(flatten(hvp(loss_fn, params, vector, "finite_difference", eps=e)), exact) for e in (4e-2, 2e-2)
    ]
    assert 3.0 < errors[0] / errors[1] < 5.0, errors


def test_auto_falls_back_to_finite_differences_under_sdpa(tiny_world, lora, monkeypatch):
    model = _lora_model(tiny_world["aligned"], attn="sdpa", lora_values=lora["params"])
    loss_fn = lora["make_loss"](model)
    params, vector, exact = lora["params"], lora["vector"], lora["exact"]
    monkeypatch.setattr(cv, "_FALLBACK_WARNED", set())
    try:
        hv = hvp(loss_fn, params, vector, method="double_backward")
    except RuntimeError:
        sdpa_double_backward = False
    else:  # a torch build whose CPU SDPA kernel has a second derivative: then it must simply be right
        sdpa_double_backward = True
        assert _rel(flatten(hv), exact) < 1e-9
    if not sdpa_double_backward:
        with pytest.warns(RuntimeWarning, match="falling back to central finite differences"):
            hv = hvp(loss_fn, params, vector, method="auto")
        assert _rel(flatten(hv), exact) < 1e-6
        with warnings.catch_warnings():  # once per cause
            warnings.simplefilter("error")
            hvp(loss_fn, params, vector, method="auto")
        with pytest.raises((RuntimeError, NotImplementedError)):
            hvp(loss_fn, params, vector, method="forward_over_reverse")

    # Strict check names the implementation; non-strict methods only report.
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        check_second_order(model, method="double_backward")
    assert len(check_second_order(model, method="auto")) == 1
    assert check_second_order(lora["model"]) == []

    # Inside second_order_attention the exact methods work and agree with the dense Hessian.
    with second_order_attention(model):
        assert model.config._attn_implementation == "eager"
        assert check_second_order(model, method="forward_over_reverse") == []
        for method in EXACT:
            assert _rel(flatten(hvp(loss_fn, params, vector, method=method)), exact) < 1e-9
    assert model.config._attn_implementation == "sdpa"
    assert model.base_model.model.model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="sdpa"):
        check_second_order(model)


def test_checkpointed_model_needs_inplace_grad_fn(tiny_world, lora):
    model = _lora_model(tiny_world["aligned"], attn="sdpa", lora_values=lora["params"])
    hf = model.base_model.model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    hf.enable_input_require_grads()
    model.train()  # HF layers checkpoint only in training mode; LoRA dropout is 0, so the loss is deterministic
    params, vector, ids = lora["params"], lora["vector"], lora["ids"]
    with pytest.raises(ValueError, match="gradient checkpointing"):
        lora["make_loss"](model)(params)
    issues = check_second_order(model, method="finite_difference")
    assert any("checkpointing" in issue for issue in issues) and any("sdpa" in issue for issue in issues)

    before = {k: v.clone() for k, v in params_of(model).items()}
    sentinel = {k: torch.full_like(v, 7.0) for k, v in before.items()}
    for name, p in model.named_parameters():
        if name in sentinel:
            p.grad = sentinel[name].clone()
    grad_fn = inplace_grad_fn(model, lambda m: causal_lm_loss(m(input_ids=ids, use_cache=False).logits, ids))
    hv = hvp(None, params, vector, method="finite_difference", grad_fn=grad_fn, check_determinism=True)
    assert _rel(flatten(hv), lora["exact"]) < 1e-6
    for name, p in model.named_parameters():  # values and previous .grad restored
        if name in before:
            assert torch.equal(p.detach(), before[name]) and torch.equal(p.grad, sentinel[name])


def test_determinism_check_catches_dropout(tiny_world, lora):
    model = _lora_model(tiny_world["aligned"], dropout=0.3, lora_values=lora["params"]).train()
    loss_fn = lora["make_loss"](model)
    with pytest.raises(NondeterministicLossError, match=r"model\.eval\(\)"):
        hvp(loss_fn, lora["params"], lora["vector"], method="double_backward", check_determinism=True)
    model.eval()
    hv = hvp(loss_fn, lora["params"], lora["vector"], method="double_backward", check_determinism=True)
    assert _rel(flatten(hv), lora["exact"]) < 1e-9


def test_cg_with_hvp_matvec_on_lora(lora):
    """CG over parameter dictionaries, H given by HVPs; compare with a dense damped solve."""
    loss_fn, params, dense = lora["loss_fn"], lora["params"], lora["dense"]
    grad = torch.func.grad(loss_fn)(params)
    damping = 1.0 + float(torch.linalg.eigvalsh(dense).abs().max())  # makes H + damping I positive definite
    result = conjugate_gradient(
        lambda v: hvp(loss_fn, params, v, method="double_backward"), grad, damping, max_iter=60, tol=1e-10
    )
    expected = torch.linalg.solve(
        dense + damping * torch.eye(dense.shape[0], dtype=dense.dtype), flatten(grad)
    )
    assert result.converged and not result.negative_curvature
    assert _rel(flatten(result.solution), expected) < 1e-8


# ------------------------------------------------------------------------------------------------------------
# solvers on explicit matrices
# ------------------------------------------------------------------------------------------------------------


def _spd(n: int, seed: int, low: float = 0.5, high: float = 5.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


def test_cg_solves_spd_system_exactly_in_n_iterations():
    n = 20
    a = _spd(n, 0)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    damping = 0.1
    result = conjugate_gradient(lambda v: a @ v, b, damping, max_iter=n, tol=1e-12)
    expected = torch.linalg.solve(a + damping * torch.eye(n, dtype=torch.float64), b)
    assert _rel(result.solution, expected) < 1e-8
    assert result.converged and not result.negative_curvature and result.iterations <= n
    hist = result.residual_history
    assert len(hist) == result.iterations + 1 and hist[0] == pytest.approx(1.0) and hist[-1] <= 1e-12
    assert all(
        later < first for first, later in zip(hist[:-4:4], hist[4::4], strict=True)
    )  # steadily decreasing
    # The recursive residuals are the true ones.
    true = (b - (a @ result.solution + damping * result.solution)).norm() / b.norm()
    assert float(true) < 1e-10
    # A warm start at the solution converges immediately; a zero right-hand side gives zero.
    assert conjugate_gradient(lambda v: a @ v, b, damping, x0=expected).iterations <= 1
    assert (
        float(
            conjugate_gradient(lambda v: a @ v, torch.zeros(n, dtype=torch.float64), damping).solution.norm()
        )
        == 0
    )


def test_cg_on_indefinite_matrix_with_and_without_enough_damping():
    n = 12
    gen = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    h = q @ torch.diag(torch.linspace(-1.0, 1.0, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    # damping 2: H + 2I is SPD (eigenvalues in [1, 3]) -> exact solve.
    ok = conjugate_gradient(lambda v: h @ v, b, 2.0, max_iter=n, tol=1e-12)
    assert ok.converged and not ok.negative_curvature
    assert _rel(ok.solution, torch.linalg.solve(h + 2.0 * torch.eye(n, dtype=torch.float64), b)) < 1e-8
    # damping 0.1: indefinite -> stops on negative curvature with a finite, usable iterate.
    bad = conjugate_gradient(lambda v: h @ v, b, 0.1, max_iter=50, tol=1e-12)
    assert bad.negative_curvature and not bad.converged
    assert torch.isfinite(bad.solution).all() and float(bad.solution.norm()) > 0
    # Negative curvature on the very first direction: returns b (steepest descent), flagged.
    first = conjugate_gradient(lambda v: -3.0 * v, b, 0.5)
    assert first.negative_curvature and first.iterations == 1 and torch.equal(first.solution, b)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_cg_rejects_nonpositive_damping(damping):
    with pytest.raises(ValueError, match=r"damping must be in \(0, inf\)"):
        conjugate_gradient(lambda v: v, torch.ones(3), damping)


def test_cg_rejects_bad_iteration_settings():
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: v, torch.ones(3), 1.0, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, torch.ones(3), 1.0, tol=-1.0)


def test_lbfgs_is_exact_for_scaled_identity():
    n, c, damping = 9, 2.5, 0.3
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    s_list = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3)]
    y_list = [c * s for s in s_list]
    torch.testing.assert_close(lbfgs_inverse(s_list, y_list, g, damping=damping), g / (c + damping))
    # No pairs: the initial matrix 1 / damping.
    torch.testing.assert_close(lbfgs_inverse([], [], g, damping=damping), g / damping)
    # Dictionaries work the same way.
    as_dict = lambda t: {"u": t[:4], "w": t[4:].reshape(5, 1)}  # noqa: E731
    out = lbfgs_inverse(
        [as_dict(s) for s in s_list], [as_dict(y) for y in y_list], as_dict(g), damping=damping
    )
    torch.testing.assert_close(flatten(out), g / (c + damping))


def test_lbfgs_approximates_the_damped_inverse():
    n, damping = 10, 0.2
    a = _spd(n, 6, 0.5, 10.0)
    g = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = torch.linalg.solve(a + damping * torch.eye(n, dtype=torch.float64), g)
    # Pairs along A-conjugate directions (the eigenvectors): BFGS' hereditary property makes n pairs exact.
    eigvecs = torch.linalg.eigh(a).eigenvectors
    history = LBFGSHistory(max_size=n, damping=damping)
    assert history.collect(lambda v: a @ v, eigvecs.T) == n
    assert _rel(history.inverse(g), expected) < 1e-10
    # Random directions: an approximation, better than the best rescaled gradient (first-order direction).
    gen = torch.Generator().manual_seed(8)
    history = LBFGSHistory(max_size=5, damping=damping)
    history.collect(lambda v: a @ v, [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(8)])
    assert len(history) == 5
    best_scaled_gradient = _rel(g * (g @ expected) / (g @ g), expected)
    assert _rel(history.inverse(g), expected) < best_scaled_gradient
    # state_dict round trip.
    clone = LBFGSHistory(max_size=5)
    clone.load_state_dict(history.state_dict())
    torch.testing.assert_close(clone.inverse(g), history.inverse(g))


def test_lbfgs_skips_pairs_without_positive_curvature():
    n = 6
    h = torch.diag(torch.tensor([-2.0, -1.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.float64)
    s_list, y_list = list(eye), [h @ e for e in eye]
    g = torch.ones(n, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="skipped 2 of 6"):
        lbfgs_inverse(s_list, y_list, g, damping=0.5)
    history = LBFGSHistory(max_size=n, damping=0.5)
    assert history.collect(lambda v: h @ v, eye) == 4 and history.skipped == 2
    # With enough damping every pair is kept, and coordinate pairs of a diagonal H are exact.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lbfgs_inverse(s_list, y_list, g, damping=3.0)
    torch.testing.assert_close(out, torch.linalg.solve(h + 3.0 * eye, g))
    with pytest.raises(ValueError, match=r"damping must be in \[0, inf\)"):
        LBFGSHistory(damping=-1.0)
    with pytest.raises(ValueError, match="max_size"):
        LBFGSHistory(max_size=0)
