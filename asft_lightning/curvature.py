"""Curvature primitives for safety restoration: Hessian-vector products and damped inverse-Hessian solvers.

Pure functions over parameter dictionaries (``dict[str, Tensor]``), no Lightning imports, in the style of
curvlinops' functional core. The restoration step of design.md section 4 needs ``d = (H_t + lambda I)^{-1} g``
where ``H_t`` is the Hessian of the retain loss with respect to the LoRA parameters and is only ever available
as a matrix-vector product. This module provides:

* :func:`hvp` -- ``H v`` by double backward (exact, about 2x a forward+backward), forward-over-reverse
  (exact, ``torch.func``, 5-8x on CPU), or central finite differences of gradients (``O(eps^2)`` error, only
  ordinary backward passes, so it works under any attention kernel, gradient checkpointing or DeepSpeed
  ZeRO-3 when given a suitable gradient oracle). ``method="auto"`` tries double backward and falls back to
  finite differences, warning once per cause. An optional ``all_reduce`` hook averages the product across
  data-parallel ranks, and ``check_determinism=True`` computes it twice to catch dropout left on.
* :func:`functional_loss`, :func:`params_of`, :func:`inplace_grad_fn`, :func:`causal_lm_loss` -- build a
  ``loss_fn(params)`` (or a gradient oracle) from an ``nn.Module`` and a subset of its parameters, e.g. the
  LoRA factors (``params_of(model, "lora_")``).
* :func:`second_order_attention` and :func:`check_second_order` -- make a Hugging Face model safe for exact
  HVPs (eager attention, the SDPA math kernel), or refuse clearly when it is not.
* :func:`conjugate_gradient` -- CG for ``(H + damping I) x = b`` with negative-curvature detection (the task
  Hessian of a network is indefinite).
* :func:`lbfgs_inverse` and :class:`LBFGSHistory` -- the L-BFGS two-loop recursion estimating
  ``(H + damping I)^{-1} g`` from curvature pairs ``(s_k, y_k)``.
* Vector helpers (:func:`dot`, :func:`norm`, :func:`axpy`, :func:`add`, :func:`sub`, :func:`scale`, ...)
  that accept either a single tensor or a ``dict[str, Tensor]``, so every solver runs on flat vectors as well
  as on parameter dictionaries.

Facts measured on the project's CPU machine (torch 2.13, transformers 5.23), which shape the defaults:

* ``F.scaled_dot_product_attention`` on CPU dispatches to the CPU flash kernel, which supports neither double
  backward ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented",
  raised by the *second* ``autograd.grad``) nor forward AD. Under ``sdpa_kernel(SDPBackend.MATH)`` both work.
* ``torch.func.functional_call`` combined with gradient checkpointing gives *silently* wrong gradients: the
  recomputation in backward runs after ``functional_call`` restored the module's own tensors (non-reentrant:
  wrong values; reentrant: no gradient at all). :func:`functional_loss` therefore refuses checkpointed modules;
  use :func:`inplace_grad_fn` with finite differences there.
* Hugging Face's eager attention computes its softmax in float32 even for a float64 model, so float64 parity
  checks through attention stop at about 1e-7 unless that function is replaced.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

import torch
from torch import Tensor, nn

__all__ = [
    "CGResult",
    "GradFn",
    "HVPMethod",
    "LBFGSHistory",
    "LossFn",
    "NondeterministicLossError",
    "TensorDict",
    "Vector",
    "add",
    "axpy",
    "causal_lm_loss",
    "check_second_order",
    "conjugate_gradient",
    "default_fd_eps",
    "dot",
    "flatten",
    "functional_loss",
    "hvp",
    "inplace_grad_fn",
    "lbfgs_inverse",
    "norm",
    "params_of",
    "scale",
    "second_order_attention",
    "sub",
    "unflatten",
    "zeros_like",
]

TensorDict = dict[str, Tensor]
"""Parameters (or a vector in parameter space) keyed by parameter name."""
Vector = Union[Tensor, Mapping[str, Tensor]]  # noqa: UP007 - runtime alias, must work on Python 3.10
"""A vector in parameter space: one tensor, or a mapping of named tensors."""
LossFn = Callable[[TensorDict], Tensor]
"""Maps a parameter dictionary to a scalar loss (must use the tensors it is given)."""
GradFn = Callable[[TensorDict], TensorDict]
"""Maps a parameter dictionary to the gradient of the loss at those parameters."""
HVPMethod = Literal["auto", "double_backward", "forward_over_reverse", "finite_difference"]

V = TypeVar("V", Tensor, TensorDict)

_METHODS = ("auto", "double_backward", "forward_over_reverse", "finite_difference")
# Causes of an ``auto`` fallback already reported (warn once per cause, not once per call).
_FALLBACK_WARNED: set[str] = set()


class NondeterministicLossError(RuntimeError):
    """Two evaluations of the same Hessian-vector product disagreed (dropout or another random op is active)."""


# ----------------------------------------------------------------------------------------------------------
# Vector helpers: a vector is one tensor or a mapping name -> tensor. Results are new objects (no in-place).
# ----------------------------------------------------------------------------------------------------------


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Reduction dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "vectors") -> None:
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(
            f"{what} have different keys: only in the first {only_a}, only in the second {only_b}"
        )


def dot(a: Vector, b: Vector) -> Tensor:
    """Inner product ``<a, b>`` as a 0-dim tensor (float64 for float64 inputs, else accumulated in float32).

    Args:
        a: A tensor or a mapping of named tensors.
        b: Same structure (same keys and shapes) as ``a``.
    """
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor)
        dt = _acc_dtype(a)
        return torch.sum(a.to(dt) * b.to(dt))
    assert not isinstance(b, Tensor)
    _check_keys(a, b)
    total: Tensor | None = None
    for key, x in a.items():
        dt = _acc_dtype(x)
        term = torch.sum(x.to(dt) * b[key].to(dt))
        total = term if total is None else total + term.to(total.device, total.dtype)
    return total if total is not None else torch.zeros((), dtype=torch.float32)


def norm(a: Vector) -> Tensor:
    """Euclidean norm ``||a||`` over all entries (see :func:`dot` for the accumulation dtype)."""
    return dot(a, a).sqrt()


def _map(fn: Callable[..., Tensor], *vectors: Vector) -> Any:
    first = vectors[0]
    if isinstance(first, Tensor):
        return fn(*vectors)
    for other in vectors[1:]:
        _check_keys(first, other)  # type: ignore[arg-type]
    return {key: fn(*(v[key] for v in vectors)) for key in first}  # type: ignore[index]


def add(a: V, b: V) -> V:
    """``a + b``."""
    return _map(torch.add, a, b)


def sub(a: V, b: V) -> V:
    """``a - b``."""
    return _map(torch.sub, a, b)


def scale(a: V, alpha: float) -> V:
    """``alpha * a``."""
    return _map(lambda x: x * alpha, a)


def axpy(alpha: float, x: V, y: V) -> V:
    """``alpha * x + y`` (BLAS naming)."""
    return _map(lambda xi, yi: torch.add(yi, xi, alpha=alpha), x, y)


def zeros_like(a: V) -> V:
    """A zero vector with the structure, dtypes and devices of ``a``."""
    return _map(torch.zeros_like, a)


def flatten(a: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the tensors of a parameter dictionary into one flat vector (in the mapping's key order)."""
    return torch.cat([t.reshape(-1) for t in a.values()])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> TensorDict:
    """Split a flat vector back into a dictionary shaped like ``like`` (inverse of :func:`flatten`).

    The pieces are views of ``flat``, so this is differentiable and usable inside ``torch.func`` transforms.
    """
    sizes = [t.numel() for t in like.values()]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, the dictionary needs {sum(sizes)}")
    return {key: piece.view(t.shape) for (key, t), piece in zip(like.items(), flat.split(sizes), strict=True)}


# ----------------------------------------------------------------------------------------------------------
# Loss functions and parameter dictionaries from modules
# ----------------------------------------------------------------------------------------------------------


def params_of(
    module: nn.Module,
    predicate: str | Callable[[str, nn.Parameter], bool] | None = None,
    *,
    clone: bool = False,
) -> TensorDict:
    """Named parameters of ``module`` as a dictionary of detached tensors, ready for :func:`hvp`.

    Args:
        module: The model (e.g. a ``peft.PeftModel``).
        predicate: Which parameters: ``None`` selects those with ``requires_grad=True`` (the trainable LoRA
            factors of a PEFT model); a string selects names containing it (``"lora_"``); a callable gets
            ``(name, parameter)`` and returns whether to keep it.
        clone: Copy the values (a snapshot). By default the tensors share storage with the module, so the
            dictionary follows in-place updates of the module's parameters.

    Returns:
        ``{name: tensor}`` in ``named_parameters()`` order, detached (``requires_grad=False``); :func:`hvp`
        makes its own leaves.

    Raises:
        ValueError: When nothing matches.
    """
    if predicate is None:

        def keep(name: str, p: nn.Parameter) -> bool:
            return p.requires_grad

    elif isinstance(predicate, str):
        pattern = predicate

        def keep(name: str, p: nn.Parameter) -> bool:
            return pattern in name

    else:
        keep = predicate
    out = {
        name: (p.detach().clone() if clone else p.detach())
        for name, p in module.named_parameters()
        if keep(name, p)
    }
    if not out:
        raise ValueError(
            f"params_of: no parameter of {type(module).__name__} matches predicate={predicate!r}"
        )
    return out


def _checkpointed_modules(module: nn.Module) -> list[str]:
    """Names of submodules that recompute activations in backward (HF layers in training mode, torch wrappers)."""
    found = []
    for name, m in module.named_modules():
        hf = getattr(m, "gradient_checkpointing", False) is True and m.training
        if hf or type(m).__name__ == "CheckpointWrapper":
            found.append(name or type(m).__name__)
    return found


def functional_loss(
    module: nn.Module,
    loss: Callable[[Any], Tensor],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> LossFn:
    """Make ``loss_fn(params) = loss(module(*args, **kwargs))`` with ``params`` substituted by ``functional_call``.

    Only the parameters named in the dictionary given to ``loss_fn`` are replaced; all others (the frozen
    base weights) are read from the module. The result is usable with every :func:`hvp` method, including
    ``forward_over_reverse`` (``torch.func``).

    Args:
        module: The model. Put it in ``eval()`` mode (or disable dropout) for reproducible curvature.
        loss: Maps the module's output to a scalar, e.g. ``lambda out: causal_lm_loss(out.logits, labels)``.
        args: Positional arguments of the forward call (the batch).
        kwargs: Keyword arguments of the forward call, e.g. ``{"input_ids": ids, "use_cache": False}``.

    Returns:
        A loss function of a parameter dictionary (keys: names from ``module.named_parameters()``).

    Raises:
        ValueError: At call time, when a key is not a parameter of ``module`` or when ``module`` uses gradient
            checkpointing (the recomputation in backward would see the module's own parameters, not the
            substituted ones: wrong or missing gradients, silently). Use :func:`inplace_grad_fn` with
            ``method="finite_difference"`` for checkpointed models.

    Example::

        params = params_of(model, "lora_")
        loss_fn = functional_loss(model, lambda out: causal_lm_loss(out.logits, ids), kwargs={"input_ids": ids})
        hv = hvp(loss_fn, params, vector)
    """
    kwargs = dict(kwargs or {})
    known = {name for name, _ in module.named_parameters(remove_duplicate=False)}

    def loss_fn(params: TensorDict) -> Tensor:
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"functional_loss: not parameters of {type(module).__name__}: {unknown[:5]}")
        ckpt = _checkpointed_modules(module)
        if ckpt:
            raise ValueError(
                "functional_loss: gradient checkpointing is active in "
                f"{ckpt[:3]}{' ...' if len(ckpt) > 3 else ''}; torch.func.functional_call gives wrong gradients "
                "under checkpointing. Call model.gradient_checkpointing_disable() (or model.eval()) for the "
                "curvature pass, or use inplace_grad_fn(...) with hvp(method='finite_difference')."
            )
        out = torch.func.functional_call(module, params, args, kwargs, strict=False)
        return loss(out)

    return loss_fn


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy in the dtype of ``logits`` (Hugging Face's built-in loss upcasts to float32).

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` token ids, ``ignore_index`` where no loss is taken; shifted here by one.
        ignore_index: Label value excluded from the mean.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


def inplace_grad_fn(module: nn.Module, compute_loss: Callable[[nn.Module], Tensor]) -> GradFn:
    """A gradient oracle for finite-difference HVPs that uses the module's own parameters and ``.backward()``.

    ``grad_fn(params)`` copies ``params`` into the module's parameters of the same names, runs
    ``compute_loss(module).backward()`` (one ordinary backward pass: works with any attention kernel and with
    reentrant or non-reentrant gradient checkpointing), reads the gradients, and restores both the parameter
    values and every parameter's previous ``.grad``. Pass it as ``hvp(..., method="finite_difference",
    grad_fn=...)``. Under DeepSpeed ZeRO-3 the parameters are partitioned; there the restoration code must
    supply an engine-aware oracle of the same signature.

    Args:
        module: The model whose parameters are perturbed in place (temporarily).
        compute_loss: Runs the forward pass on ``module`` and returns a scalar loss.

    Returns:
        ``grad_fn(params) -> {name: gradient}``; a parameter that received no gradient gets zeros.

    Raises:
        RuntimeError: (at call time) when no parameter received any gradient, e.g. reentrant checkpointing
            with frozen embeddings: call ``model.enable_input_require_grads()``.
    """

    def grad_fn(params: TensorDict) -> TensorDict:
        named = dict(module.named_parameters())
        missing = sorted(set(params) - set(named))
        if missing:
            raise ValueError(f"inplace_grad_fn: not parameters of {type(module).__name__}: {missing[:5]}")
        targets = {key: named[key] for key in params}
        saved_values = {key: p.detach().clone() for key, p in targets.items()}
        saved_grads = {name: p.grad for name, p in named.items() if p.requires_grad}
        try:
            with torch.no_grad():
                for key, p in targets.items():
                    p.copy_(params[key])
                for p in named.values():
                    p.grad = None
            with torch.enable_grad():
                loss = compute_loss(module)
                loss.backward()
            grads = {
                key: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for key, p in targets.items()
            }
            if all(p.grad is None for p in targets.values()):
                raise RuntimeError(
                    "inplace_grad_fn: no parameter received a gradient; check that they require grad and, "
                    "with reentrant gradient checkpointing, call model.enable_input_require_grads()"
                )
        finally:
            with torch.no_grad():
                for key, p in targets.items():
                    p.copy_(saved_values[key])
            for name, p in named.items():
                if name in saved_grads:
                    p.grad = saved_grads[name]
        return grads

    return grad_fn


# ----------------------------------------------------------------------------------------------------------
# Attention kernels and second derivatives
# ----------------------------------------------------------------------------------------------------------


def _hf_configs(model: nn.Module) -> list[Any]:
    """Distinct Hugging Face configs (with their sub-configs) reachable from the model's modules."""
    seen: dict[int, Any] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return list(seen.values())


def _fused_sdpa_enabled() -> bool:
    """Whether SDPA may pick a fused kernel (flash / memory-efficient / cuDNN; CPU flash follows the flash flag)."""
    b = torch.backends.cuda
    return b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled() or b.cudnn_sdp_enabled()


@contextmanager
def second_order_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run attention through kernels that support double backward and forward AD.

    Inside the block every Hugging Face config reachable from ``model`` (PEFT wrappers included) has
    ``_attn_implementation = "eager"`` when it was anything else (``"sdpa"``, ``"flash_attention_2"``, ...),
    and ``F.scaled_dot_product_attention`` is restricted to the math backend
    (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) for models that call it directly. Everything is
    restored on exit, also after an exception. Hugging Face reads the implementation at forward time, so no
    reload is needed. Caveat: padding-free (packed, ``position_ids``-delimited) batches made for flash
    attention are not separated by eager attention; use padded batches for the curvature pass.

    Args:
        model: The model (``PreTrainedModel``, ``PeftModel`` or any module).

    Yields:
        The same model.

    Example::

        with second_order_attention(model):
            hv = hvp(loss_fn, params, v, method="double_backward")
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    configs = _hf_configs(model)
    saved = [(cfg, cfg._attn_implementation) for cfg in configs]
    try:
        for cfg, impl in saved:
            if impl is not None and impl != "eager":
                cfg._attn_implementation = "eager"
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        for cfg, impl in saved:
            # Bypass the recursive setter so that sub-configs get back their own values.
            if hasattr(cfg, "_attn_implementation_internal"):
                cfg._attn_implementation_internal = impl
            else:
                cfg._attn_implementation = impl


def check_second_order(model: nn.Module, method: HVPMethod = "double_backward") -> list[str]:
    """Find what would make an exact HVP fail or, worse, silently wrong, for this model.

    Checks: Hugging Face attention implementations other than ``"eager"`` (``"sdpa"`` counts as safe only
    while SDPA is restricted to the math backend, e.g. inside :func:`second_order_attention`); active gradient
    checkpointing (breaks ``autograd.grad`` with reentrant checkpointing and ``functional_call``/``torch.func``
    with any); fused kernels from ``liger_kernel`` (their backward is not differentiable: double backward
    silently drops terms).

    Args:
        model: The model the loss runs through.
        method: The :func:`hvp` method that will be used. ``"double_backward"`` and ``"forward_over_reverse"``
            need second derivatives and raise on any issue; ``"auto"`` and ``"finite_difference"`` have a
            first-order path and only report.

    Returns:
        Human-readable issues (empty: safe for exact HVPs).

    Raises:
        ValueError: ``method`` needs second derivatives and an issue was found; the message names the
            attention implementation and the fix.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    issues: list[str] = []
    for cfg in _hf_configs(model):
        impl = cfg._attn_implementation
        if impl in (None, "eager") or (impl == "sdpa" and not _fused_sdpa_enabled()):
            continue
        issues.append(
            f"{type(cfg).__name__} uses attn_implementation={impl!r}, whose kernel has no second derivative "
            "(SDPA flash / memory-efficient / CPU flash support neither double backward nor forward AD)"
        )
    ckpt = _checkpointed_modules(model)
    if ckpt:
        issues.append(
            f"gradient checkpointing is active in {ckpt[:3]}{' ...' if len(ckpt) > 3 else ''} (reentrant "
            "checkpointing breaks autograd.grad; torch.func/functional_call break with any checkpointing)"
        )
    fused = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("liger_kernel")}
    )
    if fused:
        issues.append(
            f"fused kernels {fused} have a non-differentiable backward (double backward is silently wrong)"
        )
    if issues and method in ("double_backward", "forward_over_reverse"):
        raise ValueError(
            f"hvp(method={method!r}) needs second derivatives through the model, but "
            + "; ".join(issues)
            + ". Run it inside `with second_order_attention(model):` or load the model with "
            "attn_implementation='eager', disable gradient checkpointing for the curvature pass, or use "
            "method='finite_difference' (ordinary backward passes only)."
        )
    return issues


# ----------------------------------------------------------------------------------------------------------
# Hessian-vector products
# ----------------------------------------------------------------------------------------------------------


def _leaves(params: Mapping[str, Tensor]) -> TensorDict:
    return {key: p.detach().requires_grad_(True) for key, p in params.items()}


def _as_scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _fill(keys: Iterable[str], values: Sequence[Tensor | None], like: Mapping[str, Tensor]) -> TensorDict:
    return {
        key: (v.detach() if v is not None else torch.zeros_like(like[key]))
        for key, v in zip(keys, values, strict=True)
    }


def _hvp_double_backward(loss_fn: LossFn, params: TensorDict, vector: TensorDict) -> TensorDict:
    leaves = _leaves(params)
    keys, tensors = list(leaves), list(leaves.values())
    with torch.enable_grad():
        loss = _as_scalar(loss_fn(leaves))
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        terms = [
            (g * vector[k]).sum()
            for k, g in zip(keys, grads, strict=True)
            if g is not None and g.requires_grad
        ]
        if not terms:  # the gradient does not depend on the parameters: H = 0
            return zeros_like(params)
        hv = torch.autograd.grad(torch.stack(terms).sum(), tensors, allow_unused=True)
    return _fill(keys, hv, params)


def _hvp_forward_over_reverse(loss_fn: LossFn, params: TensorDict, vector: TensorDict) -> TensorDict:
    primals = {key: p.detach() for key, p in params.items()}
    _, hv = torch.func.jvp(torch.func.grad(lambda p: _as_scalar(loss_fn(p))), (primals,), (vector,))
    return {key: hv[key].detach() for key in params}


def _autograd_gradient(loss_fn: LossFn, params: TensorDict) -> TensorDict:
    leaves = _leaves(params)
    keys, tensors = list(leaves), list(leaves.values())
    with torch.enable_grad():
        loss = _as_scalar(loss_fn(leaves))
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return _fill(keys, grads, params)


def default_fd_eps(
    params: Mapping[str, Tensor], vector: Mapping[str, Tensor], dtype: torch.dtype | None = None
) -> float:
    """Step of the central difference: ``eps = u^(1/3) * (1 + ||p||) / ||v||``.

    ``u`` is the unit roundoff (``torch.finfo(dtype).eps``) of the parameters. The central difference has
    truncation error ``O(eps^2 ||v||^3)`` and rounding error ``O(u ||grad|| / (eps ||v||))``; balancing the two
    gives a step ``~ u^(1/3)`` relative to the scale of the parameters, so the perturbation ``eps * v`` has
    norm ``u^(1/3) (1 + ||p||)``: about 5e-3 relative in float32, 6e-6 in float64 (the cube-root rule of
    numerical differentiation, Nocedal & Wright, Numerical Optimization, section 8.1). The ``1 +`` keeps the
    step away from zero at ``p = 0`` (e.g. freshly initialised LoRA ``B``).

    Args:
        params: The point.
        vector: The direction (non-zero).
        dtype: The precision the *gradient* is computed in; default: the parameters' dtype. Pass the compute
            dtype when it is lower, e.g. ``torch.bfloat16`` for float32 LoRA factors on a bfloat16 base model
            (the float32 rule would drown the difference in bfloat16 rounding noise).
    """
    if dtype is None:
        dtype = next(iter(params.values())).dtype
    u = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    v_norm = float(norm(vector))
    return u ** (1.0 / 3.0) * (1.0 + float(norm(params))) / v_norm


def _hvp_finite_difference(
    loss_fn: LossFn | None, params: TensorDict, vector: TensorDict, eps: float | None, grad_fn: GradFn | None
) -> TensorDict:
    if float(norm(vector)) == 0.0:
        return zeros_like(params)
    step = default_fd_eps(params, vector) if eps is None else float(eps)
    if not (step > 0 and math.isfinite(step)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if grad_fn is None:
        assert loss_fn is not None

        def oracle(p: TensorDict) -> TensorDict:
            return _autograd_gradient(loss_fn, p)

    else:
        oracle = grad_fn
    with torch.no_grad():
        plus = {k: p.detach() + step * vector[k] for k, p in params.items()}
        minus = {k: p.detach() - step * vector[k] for k, p in params.items()}
    g_plus = oracle(plus)
    g_minus = oracle(minus)
    return {k: ((g_plus[k] - g_minus[k]) / (2.0 * step)).detach() for k in params}


def _warn_fallback_once(exc: BaseException) -> None:
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    cause = f"{type(exc).__name__}: {first_line}"
    if cause in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(cause)
    warnings.warn(
        f"hvp(method='auto'): double backward failed ({cause}); falling back to central finite differences of "
        "gradients (O(eps^2) error, two ordinary backward passes). Typical causes: an SDPA/flash attention "
        "kernel or reentrant gradient checkpointing without second derivatives, or out of memory. For exact "
        "HVPs wrap the call in `with second_order_attention(model):` (eager attention) or pass "
        "method='finite_difference' to skip the failing attempt. This warning is shown once per cause.",
        RuntimeWarning,
        stacklevel=4,  # _warn_fallback_once <- _hvp_once <- hvp <- caller
    )


def _hvp_once(
    loss_fn: LossFn | None,
    params: TensorDict,
    vector: TensorDict,
    method: str,
    eps: float | None,
    grad_fn: GradFn | None,
) -> TensorDict:
    if method == "finite_difference":
        return _hvp_finite_difference(loss_fn, params, vector, eps, grad_fn)
    assert loss_fn is not None
    if method == "double_backward":
        return _hvp_double_backward(loss_fn, params, vector)
    if method == "forward_over_reverse":
        return _hvp_forward_over_reverse(loss_fn, params, vector)
    try:  # auto
        return _hvp_double_backward(loss_fn, params, vector)
    except RuntimeError as exc:  # NotImplementedError and OutOfMemoryError are RuntimeErrors too
        _warn_fallback_once(exc)
        return _hvp_finite_difference(loss_fn, params, vector, eps, grad_fn)


def hvp(
    loss_fn: LossFn | None,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    method: HVPMethod = "auto",
    eps: float | None = None,
    *,
    grad_fn: GradFn | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    check_determinism: bool = False,
    determinism_rtol: float | None = None,
) -> TensorDict:
    """Hessian-vector product ``H v`` of ``loss_fn`` at ``params``.

    Args:
        loss_fn: Maps a parameter dictionary to a scalar and must compute with the tensors it is given (e.g.
            :func:`functional_loss`); parameters are fresh leaves made here, detached from ``params``. May be
            ``None`` only with ``method="finite_difference"`` and a ``grad_fn``.
        params: The point, ``{name: tensor}``.
        vector: The direction, same keys and shapes as ``params`` (cast to their dtype and device).
        method: ``"double_backward"`` (``autograd.grad`` with ``create_graph=True``, then the gradient of
            ``<g, v>``; exact, ~2x a forward+backward); ``"forward_over_reverse"`` (``torch.func.jvp`` of
            ``torch.func.grad``; exact, needs a ``torch.func``-compatible loss, slower on CPU);
            ``"finite_difference"`` (``(grad(p + eps v) - grad(p - eps v)) / (2 eps)``, ``O(eps^2)`` error,
            two ordinary backward passes: works with any kernel, checkpointing (with ``grad_fn``) or ZeRO-3);
            ``"auto"`` (double backward; on a ``RuntimeError``, e.g. an attention kernel without a second
            derivative, finite differences, with a warning shown once per cause). ``"auto"`` cannot detect
            kernels whose double backward is silently wrong: see :func:`check_second_order`.
        eps: Finite-difference step; default :func:`default_fd_eps` (cube-root rule scaled by
            ``(1 + ||p||) / ||v||``, for the parameters' dtype; with a lower-precision forward pass use
            ``eps=default_fd_eps(params, vector, dtype=torch.bfloat16)``). Ignored by the exact methods.
        grad_fn: Gradient oracle used by finite differences instead of ``autograd.grad`` over ``loss_fn``
            (e.g. :func:`inplace_grad_fn` for checkpointed models, or an engine-aware oracle under ZeRO-3).
        all_reduce: Applied to every output tensor, e.g. a mean all-reduce across data-parallel ranks (each
            rank holds the HVP of its own shard of the batch). No ``torch.distributed`` call is made here.
        check_determinism: Compute the product twice and raise :class:`NondeterministicLossError` if the two
            differ by more than ``determinism_rtol`` (relative, in norm): catches dropout left on. Doubles the cost.
        determinism_rtol: Tolerance of that check; default ``1e-4`` (float32/float64; room for nondeterministic
            GPU reductions) or ``1e-2`` (float16/bfloat16).

    Returns:
        ``{name: (H v)[name]}``, detached, with the dtype and device of ``params``; zeros for parameters the
        loss does not depend on.

    Raises:
        ValueError: Unknown ``method``, mismatched keys or shapes, a non-scalar loss, ``eps <= 0``.
        NondeterministicLossError: ``check_determinism`` found two different results.
        RuntimeError: From autograd when the requested exact method is unsupported by a kernel.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if loss_fn is None and not (method == "finite_difference" and grad_fn is not None):
        raise ValueError("loss_fn may be None only with method='finite_difference' and a grad_fn")
    if not params:
        raise ValueError("params is empty")
    _check_keys(params, vector, "params and vector")
    bad = [k for k in params if params[k].shape != vector[k].shape]
    if bad:
        raise ValueError(
            "params and vector differ in shape for "
            + ", ".join(f"{k}: {tuple(params[k].shape)} vs {tuple(vector[k].shape)}" for k in bad[:5])
        )
    params = dict(params)
    vec = {k: vector[k].detach().to(device=p.device, dtype=p.dtype) for k, p in params.items()}
    out = _hvp_once(loss_fn, params, vec, method, eps, grad_fn)
    if check_determinism:
        again = _hvp_once(loss_fn, params, vec, method, eps, grad_fn)
        low = next(iter(params.values())).dtype in (torch.float16, torch.bfloat16)
        rtol = determinism_rtol if determinism_rtol is not None else (1e-2 if low else 1e-4)
        diff, size = float(norm(sub(out, again))), max(float(norm(out)), float(norm(again)))
        if not diff <= rtol * size + 1e-30:
            raise NondeterministicLossError(
                f"hvp(check_determinism=True): two evaluations of the same Hessian-vector product differ "
                f"(||Hv_1 - Hv_2|| = {diff:.3e}, relative {diff / max(size, 1e-30):.3e} > rtol {rtol:.1e}). The "
                "loss is random: dropout (LoRA dropout, attention dropout) or another stochastic op is "
                "active. Call model.eval() (or set the dropout probabilities to 0) for the curvature pass."
            )
    if all_reduce is not None:
        out = {k: all_reduce(t) for k, t in out.items()}
    return out


# ----------------------------------------------------------------------------------------------------------
# Solvers for (H + damping I) x = b
# ----------------------------------------------------------------------------------------------------------


def _check_damping(damping: float, allow_zero: bool = False) -> float:
    value = float(damping)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        valid = "[0, inf)" if allow_zero else "(0, inf)"
        raise ValueError(f"damping must be in {valid} (finite), got {damping!r}")
    return value


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`."""

    solution: Any
    """The final iterate ``x`` (same structure as the right-hand side: a tensor or a parameter dictionary)."""
    iterations: int
    """Number of matrix-vector products with ``H`` spent in the iteration (not counting ``x0``'s residual)."""
    residual_history: list[float] = field(default_factory=list)
    """``||b - (H + damping I) x_k|| / ||b||`` for ``k = 0 .. iterations`` (recursively updated residuals)."""
    converged: bool = False
    """Whether the relative residual reached ``tol``."""
    negative_curvature: bool = False
    """Whether a search direction with ``p^T (H + damping I) p <= 0`` stopped the iteration."""


def conjugate_gradient(
    matvec: Callable[[V], V],
    b: V,
    damping: float,
    max_iter: int = 50,
    tol: float = 1e-6,
    x0: V | None = None,
) -> CGResult:
    """Solve ``(H + damping I) x = b`` by conjugate gradients, given ``H`` only as ``matvec(v) = H v``.

    The Hessian of a network's loss is indefinite, so ``H + damping I`` may not be positive definite. When a
    search direction has ``p^T (H + damping I) p <= 0`` the iteration stops and returns the current iterate
    with ``negative_curvature=True`` (truncated / Newton-CG, Nocedal & Wright Alg. 7.1). If that happens on
    the very first direction without an ``x0`` (no progress yet), the returned solution is ``b`` itself, the
    steepest-descent direction, so the caller always receives a usable direction. Raise ``damping`` to make
    this rarer.

    Args:
        matvec: ``v -> H v`` (e.g. ``lambda v: hvp(loss_fn, params, v)``), without the damping.
        b: Right-hand side (a tensor or a parameter dictionary).
        damping: ``lambda > 0`` added to the diagonal.
        max_iter: Maximum number of ``matvec`` calls, ``>= 1``.
        tol: Stop when ``||r_k|| / ||b|| <= tol``, ``>= 0``.
        x0: Initial guess (default zero).

    Returns:
        :class:`CGResult`.

    Raises:
        ValueError: ``damping <= 0`` (or not finite), ``max_iter < 1``, ``tol < 0``.
    """
    lam = _check_damping(damping)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")

    def a_mul(v: V) -> V:
        return axpy(lam, v, matvec(v))

    b_norm = float(norm(b))
    if b_norm == 0.0:
        return CGResult(zeros_like(b), 0, [0.0], True, False)
    if x0 is None:
        x, r = zeros_like(b), b
    else:
        x, r = x0, sub(b, a_mul(x0))
    p = r
    rs = float(dot(r, r))
    history = [math.sqrt(rs) / b_norm]
    if history[0] <= tol:
        return CGResult(x, 0, history, True, False)
    iterations, converged, negative = 0, False, False
    for _ in range(int(max_iter)):
        ap = a_mul(p)
        iterations += 1
        curvature = float(dot(p, ap))
        if not curvature > 0:
            negative = True
            if iterations == 1 and x0 is None:
                x = b
            break
        alpha = rs / curvature
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rs_new = float(dot(r, r))
        history.append(math.sqrt(rs_new) / b_norm)
        if history[-1] <= tol:
            converged = True
            break
        p = axpy(rs_new / rs, p, r)
        rs = rs_new
    return CGResult(x, iterations, history, converged, negative)


def lbfgs_inverse(
    s_list: Sequence[V],
    y_list: Sequence[V],
    g: V,
    damping: float = 0.0,
    gamma: float | None = None,
) -> V:
    """L-BFGS two-loop recursion: an estimate of ``(H + damping I)^{-1} g`` from curvature pairs.

    Each pair satisfies ``y_k ~ H s_k``; the damped pair ``(s_k, y_k + damping s_k)`` is used (pass
    ``damping=0`` when the ``y_k`` already include it, as :class:`LBFGSHistory` stores them). Pairs whose
    damped curvature ``y^T s`` is not positive would break positive definiteness and are skipped, with a
    ``RuntimeWarning`` giving their count. The initial matrix is ``gamma I``, by default
    ``gamma = s^T y / y^T y`` of the newest kept pair (Nocedal & Wright eq. 7.20); without any pair it is
    ``1 / damping`` (or ``1`` when ``damping == 0``). With ``H = c I`` the result is exactly
    ``g / (c + damping)``.

    Args:
        s_list: Steps ``s_k``, oldest first (tensors or parameter dictionaries).
        y_list: Curvature products ``y_k = H s_k``, same order.
        g: The vector to multiply.
        damping: ``lambda >= 0``.
        gamma: Scale of the initial inverse-Hessian estimate (``> 0``), overriding the default.

    Returns:
        The estimate, with the structure of ``g``.

    Raises:
        ValueError: Lists of different lengths, ``damping < 0``, ``gamma <= 0``.
    """
    lam = _check_damping(damping, allow_zero=True)
    if len(s_list) != len(y_list):
        raise ValueError(f"s_list and y_list differ in length: {len(s_list)} vs {len(y_list)}")
    if gamma is not None and not (float(gamma) > 0 and math.isfinite(float(gamma))):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    pairs: list[tuple[Any, Any, float]] = []
    skipped = 0
    for s, y in zip(s_list, y_list, strict=True):
        y_d = axpy(lam, s, y) if lam else y
        ys = float(dot(y_d, s))
        if not ys > 0:
            skipped += 1
            continue
        pairs.append((s, y_d, 1.0 / ys))
    if skipped:
        warnings.warn(
            f"lbfgs_inverse: skipped {skipped} of {len(s_list)} curvature pairs with y^T s <= 0 (negative "
            "curvature along s); increase damping to keep them",
            RuntimeWarning,
            stacklevel=2,
        )
    if gamma is None:
        if pairs:
            s_new, y_new, rho_new = pairs[-1]
            gamma = 1.0 / (rho_new * float(dot(y_new, y_new)))
        else:
            gamma = 1.0 / lam if lam > 0 else 1.0
    q = g
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(dot(s, q))
        alphas.append(a)
        q = axpy(-a, y, q)
    r = scale(q, float(gamma))
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        beta = rho * float(dot(y, r))
        r = axpy(a - beta, s, r)
    return r


class LBFGSHistory:
    """A bounded store of L-BFGS curvature pairs ``(s, y = H s + damping s)`` and their inverse estimate.

    Pairs are tensors or parameter dictionaries (all of one kind). Pairs with ``y^T s <= 0`` are refused and
    counted in :attr:`skipped`; when more than ``max_size`` pairs are added, the oldest are dropped.

    Args:
        max_size: Number of pairs kept (``m``), ``>= 1``.
        damping: ``lambda >= 0`` added to every ``y`` on insertion, so the estimate targets ``H + lambda I``.

    Example::

        history = LBFGSHistory(max_size=10, damping=1e-3)
        history.collect(lambda v: hvp(loss_fn, params, v), directions)
        d = history.inverse(g)  # ~ (H + 1e-3 I)^{-1} g
    """

    def __init__(self, max_size: int = 10, damping: float = 0.0) -> None:
        if int(max_size) < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size!r}")
        self.max_size = int(max_size)
        self.damping = _check_damping(damping, allow_zero=True)
        self.s: deque[Any] = deque(maxlen=self.max_size)
        self.y: deque[Any] = deque(maxlen=self.max_size)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.s)

    def add(self, s: V, y: V) -> bool:
        """Store the pair ``(s, y + damping s)``; ``y`` is the undamped product ``H s``.

        Returns:
            Whether the pair was kept (``False``: its damped curvature ``y^T s`` was not positive).
        """
        y_d = axpy(self.damping, s, y) if self.damping else y
        if not float(dot(y_d, s)) > 0:
            self.skipped += 1
            return False
        self.s.append(_detach(s))
        self.y.append(_detach(y_d))
        return True

    def collect(self, matvec: Callable[[V], V], directions: Iterable[V]) -> int:
        """Add one pair per direction ``s``, with ``y = matvec(s)`` (e.g. an :func:`hvp` closure).

        Returns:
            The number of pairs kept.
        """
        return sum(self.add(s, matvec(s)) for s in directions)

    def inverse(self, g: V, gamma: float | None = None) -> V:
        """Estimate ``(H + damping I)^{-1} g`` by the two-loop recursion over the stored pairs."""
        return lbfgs_inverse(list(self.s), list(self.y), g, damping=0.0, gamma=gamma)

    def clear(self) -> None:
        """Forget all pairs (e.g. after a large parameter update)."""
        self.s.clear()
        self.y.clear()

    def state_dict(self) -> dict[str, Any]:
        """Pairs and counters, for checkpointing."""
        return {
            "max_size": self.max_size,
            "damping": self.damping,
            "s": list(self.s),
            "y": list(self.y),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the current ``max_size`` bounds the restored pairs)."""
        self.damping = _check_damping(state["damping"], allow_zero=True)
        self.s = deque(state["s"], maxlen=self.max_size)
        self.y = deque(state["y"], maxlen=self.max_size)
        self.skipped = int(state["skipped"])


def _detach(v: V) -> V:
    return _map(lambda t: t.detach(), v)
