"""Curvature-aware safety restoration of a LoRA fine-tune: a plain function over a PEFT model and batches.

This is this project's concrete formulation of Bach et al. (arXiv 2511.18039, TMLR 2026), who publish no code
(design.md section 4). With ``phi`` the LoRA parameters, ``L_h`` the loss on harmful prompts with harmful
completions, ``L_t`` the loss on retain (task / benign) data and ``L_r`` the loss on refusals, each step

    g   = grad_phi [ L_h(phi) - mu * L_r(phi) ]          ascent direction
    d   = (H_t + lambda I)^{-1} g                        CG on Hessian-vector products of L_t, or L-BFGS;
                                                         or H_t ~ F, the retain examples' empirical Fisher
                                                         (exact Woodbury inverse, no HVP: ``solver="fisher"``)
    d   = d restricted to the top modules by |g_l^T d_l| (optional, "influence" selection)
    eta = min(eta_max, sqrt(2 delta / d^T (H_t + lambda I) d))      trust region on the task curvature
    phi = phi + eta * d

and stops when ``L_h`` is back at the aligned reference's level (the model with the adapter disabled, or a
given reference model), after ``max_steps``, or when ``L_t`` would rise more than ``task_loss_budget`` (the step
is halved up to ``backtracks`` times first, then undone). The first-order baseline uses ``d = g`` with the same
trust region. Each step takes the harmful loss and its gradient from one forward and backward. Everything is
deterministic: the model is put in eval mode (no dropout) for the duration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from asft_lightning import curvature as cv
from asft_lightning.errors import ArgumentError, DataError
from asft_lightning.fisher import EmpiricalFisher

Batch = dict[str, Tensor]
AllReduce = Callable[[Tensor], Tensor]

LANDING_SLACK = 0.01
"""Nats past the stop level ``reference - target_margin`` where an overshooting step lands (when that is above the
reference). Landing exactly on the stop level made the secant fall short by a hair on a convex ``L_h``, and each
later step closed only part of the rest: 8 steps and 20 minutes for the last 0.006 nats at ``target_margin=-0.2``."""


def landing_level(reference_loss: float, target_margin: float) -> float:
    """Where a step that overshoots the target is shortened to land: ``max(reference, stop + LANDING_SLACK)``.

    Args:
        reference_loss: the aligned reference's harmful loss.
        target_margin: restoration stops when ``L_h >= reference_loss - target_margin``.

    Returns:
        The harmful loss the secant aims at; at least the stop level plus ``LANDING_SLACK`` when the stop level is
        at or above ``reference - LANDING_SLACK``, else the reference.
    """
    return reference_loss + max(0.0, LANDING_SLACK - target_margin)  # exactly the reference at the default margin


LANDING_EVALS = 4
"""Most harmful-loss evaluations spent landing one overshooting step (:func:`land`). A single secant fell short on
the world's convex ``L_h`` (0.928 aimed at 0.949 on a full fine-tune), and each further step to close the gap costs
a gradient and two forwards (~90 s there) where a landing evaluation is one forward of the harmful batches."""


def land(loss_at: Callable[[float], float], below: tuple[float, float], above: tuple[float, float], aim: float,
         stop: float, max_evals: int = LANDING_EVALS) -> tuple[float, float, int]:
    """Shorten an overshooting step: false position (Illinois variant) for ``loss_at(x) = aim`` on a bracket.

    ``x`` is the step size along the step's direction; ``below = (x_lo, L_lo)`` with ``L_lo < stop`` (the step's
    start), ``above = (x_hi, L_hi)`` with ``L_hi > aim >= stop`` (the full step). Each iteration evaluates the
    secant's point of the current bracket; the first point at or past ``stop`` is accepted (the restoration is
    done there: the aim lies a little past the stop level, so an evaluation that lands between the two still
    ends the run), a point short of it replaces the bracket's lower end, and the upper end's loss is halved in the
    secant when it is kept twice in a row (Illinois), which keeps false position from creeping on a convex ``L_h``.
    The first iteration is the plain secant of the step. Pure over the callable, so it is tested on scalar functions.

    Args:
        loss_at: sets the step size to ``x`` (the caller moves the parameters there) and returns ``L_h`` at it.
        below: ``(x, L_h)`` short of the stop level.
        above: ``(x, L_h)`` past the aim.
        aim: the harmful loss the secant aims at (:func:`landing_level`).
        stop: the stop level ``reference - target_margin`` (<= ``aim``).
        max_evals: most calls of ``loss_at``, >= 1.

    Returns:
        ``(x, L_h, evaluations)`` of the last point evaluated: at or past ``stop`` unless ``max_evals`` ran out
        first, when it is the highest point found short of it (the next restoration step goes on from there).
    """
    (x_lo, f_lo), (x_hi, f_hi) = below, above
    weight_hi, kept_hi = f_hi, 0
    x, f = x_lo, f_lo
    for evals in range(1, max_evals + 1):
        x = x_lo + (x_hi - x_lo) * (aim - f_lo) / (weight_hi - f_lo)
        f = loss_at(x)
        if f >= stop:
            return x, f, evals
        x_lo, f_lo = x, f
        kept_hi += 1
        if kept_hi >= 2:
            weight_hi = aim + (weight_hi - aim) / 2
    return x, f, max_evals


@dataclass
class RestorationConfig:
    """Settings of :func:`restore`, each checked in ``__post_init__``.

    Declared once here: ``asft restore`` and the ``CurvatureRestoration`` callback take these fields as their own
    keyword arguments (``**restoration``), so both list every one in ``--help`` with the text below.

    Args:
        method: ``curvature``: precondition the ascent by ``(H_t + damping I)^{-1}``; ``first_order``: ``d = g``
            (the baseline).
        solver: inverse-curvature solver: ``cg`` (conjugate gradient on HVPs of ``L_t``), ``lbfgs`` (the L-BFGS
            two-loop estimate, one HVP a step) or ``fisher`` (the empirical Fisher of the retain examples, ``F =
            mean_i g_i g_i^T`` from one gradient per retain example taken once, inverted exactly by Woodbury: no
            HVP at all, the cheapest; it is also the trust region's metric, for ``first_order`` too; one process
            only); ``auto`` (default): ``fisher`` on one process, ``cg`` under data parallelism. The report's
            ``config`` records the solver that ran.
        max_steps: most restoration steps, >= 1.
        damping: initial ``lambda`` in ``H_t + lambda I``, > 0; raised automatically when CG meets negative
            curvature (``cg`` and ``lbfgs``).
        fisher_damping: ``fisher`` solver: ``lambda = fisher_damping * trace(F) / N``, relative to the mean
            non-zero eigenvalue of ``F`` (N retain examples), > 0; smaller protects the retain examples' directions
            more.
        max_damping_increases: when CG meets negative curvature (``H_t`` is indefinite), multiply the damping by 4,
            up to this often, >= 0.
        cg_max_iter: most CG iterations per step, >= 1.
        cg_tol: CG relative residual tolerance, > 0.
        lbfgs_history: curvature pairs kept by the L-BFGS solver, >= 1.
        trust_region: ``delta``: the step keeps ``1/2 eta^2 d^T (H_t + lambda I) d <= delta``, > 0. Default 0.2,
            the setting the default margin was chosen at: one step usually reaches it, and the landing shortens it.
        max_step_size: largest step multiplier ``eta_max``, > 0.
        refusal_weight: ``mu``, weight of the refusal loss in the ascent direction, >= 0 (> 0 needs refusal data).
        task_loss_budget: most increase of the retain loss over its value before restoration (nats), >= 0.
        backtracks: halvings of a step that breaks the task budget before it is undone and restoration stops, >= 0.
        top_modules: update only this many modules with the largest influence ``|g_l^T d_l|`` (``None``: all).
        target_margin: stop when the harmful loss reaches ``reference - target_margin``; negative asks for more
            than the reference. Default ``-0.1`` (0.1 nats beyond the aligned model's harmful loss), chosen by the
            rule of ``benchmarks/restore_margin.py`` over 0.01, -0.1, -0.2 and -0.3 on the world (3 seeds: 61% of
            the fine-tune's harmful score removed, benign refusal at the aligned model's level, FA -0.4 points);
            ``0.01`` stops at the reference itself (25% removed there).
        land_on_target: shorten a step that overshoots the target, for the smallest sufficient update: false
            position on ``L_h`` along the step (:func:`land`, at most ``LANDING_EVALS`` forwards of the harmful
            data) aimed at ``max(reference, reference - target_margin + LANDING_SLACK)``: at the reference for the
            default margin, a little past the stop level otherwise, so that a landing that falls just short does
            not leave a run of ever smaller steps.
        hvp_method: ``auto``, ``double_backward``, ``forward_over_reverse`` or ``finite_difference`` (see
            :func:`asft_lightning.curvature.hvp`).
        check_determinism: compute the first HVP twice and fail if they differ (catches dropout left on).
    """

    method: Literal["curvature", "first_order"] = "curvature"
    solver: Literal["auto", "cg", "lbfgs", "fisher"] = "auto"
    max_steps: int = 10
    damping: float = 1.0
    fisher_damping: float = 1.0
    max_damping_increases: int = 4
    cg_max_iter: int = 10
    cg_tol: float = 1e-3
    lbfgs_history: int = 10
    trust_region: float = 0.2
    max_step_size: float = 10.0
    refusal_weight: float = 0.0
    task_loss_budget: float = 0.1
    backtracks: int = 3
    top_modules: int | None = None
    target_margin: float = -0.1
    land_on_target: bool = True
    hvp_method: cv.HVPMethod = "auto"
    check_determinism: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.method not in ("curvature", "first_order"):
            problems.append(f"method must be 'curvature' or 'first_order', got {self.method!r}")
        if self.solver not in ("auto", "cg", "lbfgs", "fisher"):
            problems.append(f"solver must be 'auto', 'cg', 'lbfgs' or 'fisher', got {self.solver!r}")
        if not (self.fisher_damping > 0 and math.isfinite(self.fisher_damping)):
            problems.append(f"fisher_damping must be in (0, inf), got {self.fisher_damping}")
        if self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not (self.damping > 0 and math.isfinite(self.damping)):
            problems.append(f"damping must be in (0, inf), got {self.damping}")
        if self.max_damping_increases < 0:
            problems.append(f"max_damping_increases must be >= 0, got {self.max_damping_increases}")
        if self.cg_max_iter < 1:
            problems.append(f"cg_max_iter must be >= 1, got {self.cg_max_iter}")
        if not self.cg_tol > 0:
            problems.append(f"cg_tol must be > 0, got {self.cg_tol}")
        if self.lbfgs_history < 1:
            problems.append(f"lbfgs_history must be >= 1, got {self.lbfgs_history}")
        if not self.trust_region > 0:
            problems.append(f"trust_region must be > 0, got {self.trust_region}")
        if not self.max_step_size > 0:
            problems.append(f"max_step_size must be > 0, got {self.max_step_size}")
        if self.refusal_weight < 0:
            problems.append(f"refusal_weight must be >= 0, got {self.refusal_weight}")
        if not self.task_loss_budget >= 0:
            problems.append(f"task_loss_budget must be >= 0, got {self.task_loss_budget}")
        if self.backtracks < 0:
            problems.append(f"backtracks must be >= 0, got {self.backtracks}")
        if not math.isfinite(self.target_margin):
            problems.append(f"target_margin must be finite, got {self.target_margin}")
        if self.top_modules is not None and self.top_modules < 1:
            problems.append(f"top_modules must be >= 1 or None, got {self.top_modules}")
        if problems:
            raise ArgumentError("invalid restoration settings: " + "; ".join(problems))


@dataclass
class StepRecord:
    """What one restoration step did."""

    step: int
    harmful_loss: float
    task_loss: float
    refusal_loss: float | None
    step_size: float
    quadratic: float
    damping: float
    cg_residual: float | None
    cg_iterations: int | None
    modules_touched: list[str]
    backtracks: int
    seconds: float
    landing_evals: int = 0
    """Harmful-loss evaluations spent landing the step (:func:`land`; 0: it did not overshoot)."""


@dataclass
class RestorationResult:
    """The outcome of :func:`restore`: the reference level, the trajectory, and why it stopped."""

    reference_harmful_loss: float
    initial_harmful_loss: float
    initial_task_loss: float
    final_harmful_loss: float
    final_task_loss: float
    stop_reason: str
    restored: bool
    records: list[StepRecord] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> Tensor:
    """Mean over ``batches`` of the response-token cross-entropy (computed in the logits' dtype)."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in batches:
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        total = total + cv.causal_lm_loss(out.logits, batch["labels"].to(device))
    return total / len(batches)


def _functional(model: nn.Module, batches: Sequence[Batch]) -> cv.LossFn:
    def loss_fn(params: cv.TensorDict) -> Tensor:
        device = next(iter(params.values())).device
        total = 0.0
        for batch in batches:
            out = torch.func.functional_call(
                model,
                params,
                (),
                {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)},
                strict=False,
            )
            total = total + cv.causal_lm_loss(out.logits, batch["labels"].to(device))
        return total / len(batches)

    return loss_fn


def _batch_mean(fns: Sequence[cv.LossFn], compute: Callable[[cv.LossFn], cv.TensorDict]) -> cv.TensorDict:
    """Mean over ``fns`` (one loss per batch) of ``compute(fn)``, one batch's graph in memory at a time.

    Gradients and Hessian-vector products are linear in the loss, so the mean of the per-batch results equals the
    result for the mean loss; a double backward then holds one batch's second-order graph instead of every batch's
    (which ran out of 24 GB on the SmolLM2 world with 8 batches of 8 x 160 tokens).
    """
    total: cv.TensorDict | None = None
    for fn in fns:
        part = compute(fn)
        total = part if total is None else cv.add(total, part)
    return cv.scale(total, 1.0 / len(fns))


def _mean_value_and_grad(fns: Sequence[cv.LossFn], params: cv.TensorDict) -> tuple[Tensor, cv.TensorDict]:
    """Value and gradient of the mean of ``fns``, batch by batch (one forward and backward each)."""
    values: list[Tensor] = []

    def value_and_grad(fn: cv.LossFn) -> cv.TensorDict:
        loss, grad = _value_and_grad(fn, params)
        values.append(loss)
        return grad

    grad = _batch_mean(fns, value_and_grad)
    return sum(values) / len(values), grad


def _mean_grad(fns: Sequence[cv.LossFn], params: cv.TensorDict) -> cv.TensorDict:
    """Gradient of the mean of ``fns``, batch by batch."""
    return _mean_value_and_grad(fns, params)[1]


def per_example_gradients(model: nn.Module, batches: Sequence[Batch], params: cv.TensorDict) -> list[cv.TensorDict]:
    """The gradient of each example's own loss (its response tokens' mean cross-entropy), one example at a time.

    Each row of each batch is cut to its attention mask (right padding, as :func:`asft_lightning.data.collate`
    makes), so no padding is computed. These are the rows of the empirical Fisher (:mod:`asft_lightning.fisher`).
    """
    grads = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            one = {k: batch[k][i : i + 1, :n] for k in ("input_ids", "attention_mask", "labels")}
            grads.append(_value_and_grad(_functional(model, [one]), params)[1])
    return grads


def _mean_hvp(fns: Sequence[cv.LossFn], params: cv.TensorDict, v: cv.TensorDict, method: cv.HVPMethod) -> cv.TensorDict:
    """``H v`` of the mean of ``fns``, batch by batch."""
    return _batch_mean(fns, lambda fn: cv.hvp(fn, params, v, method=method))


def _value_and_grad(loss_fn: cv.LossFn, params: cv.TensorDict) -> tuple[Tensor, cv.TensorDict]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        loss = loss_fn(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(leaves.items(), grads, strict=True)}


def module_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Group LoRA parameter names by their module (``...q_proj.lora_A.default.weight`` -> ``...q_proj``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        module = name.split(".lora_")[0] if ".lora_" in name else name
        groups.setdefault(module, []).append(name)
    return groups


def select_by_influence(g: cv.TensorDict, d: cv.TensorDict, top: int) -> tuple[cv.TensorDict, list[str]]:
    """Keep ``d`` on the ``top`` modules with the largest ``|g_l^T d_l|``; zero elsewhere."""
    groups = module_groups(list(d))
    influence = {m: abs(float(sum((g[k] * d[k]).sum() for k in keys))) for m, keys in groups.items()}
    chosen = sorted(influence, key=influence.get, reverse=True)[:top]
    keep = {k for m in chosen for k in groups[m]}
    return {k: (v if k in keep else torch.zeros_like(v)) for k, v in d.items()}, sorted(chosen)


def _apply(model_params: dict[str, nn.Parameter], delta: cv.TensorDict, alpha: float) -> None:
    with torch.no_grad():
        for k, v in delta.items():
            model_params[k].add_(v, alpha=alpha)


def reference_harmful_loss(model: nn.Module, harmful: Sequence[Batch], reference: nn.Module | None = None) -> float:
    """``L_h`` of the aligned reference: ``reference`` if given, else ``model`` with its adapter disabled."""
    with torch.no_grad():
        if reference is not None:
            return float(mean_loss(reference, harmful))
        if not hasattr(model, "disable_adapter"):
            raise ArgumentError("reference_harmful_loss: the model is not a PEFT model; pass the aligned reference model")
        with model.disable_adapter():
            return float(mean_loss(model, harmful))


def resolve_solver(cfg: RestorationConfig, distributed: bool) -> RestorationConfig:
    """``cfg`` with ``solver="auto"`` replaced by the solver that runs: ``fisher`` on one process, ``cg`` otherwise.

    Args:
        cfg: the settings.
        distributed: whether losses and gradients are averaged across data-parallel ranks.

    Returns:
        ``cfg`` itself when its solver is explicit, else a copy with the chosen solver.
    """
    if cfg.solver != "auto":
        return cfg
    return replace(cfg, solver="cg" if distributed else "fisher")


def restore(
    model: nn.Module,
    harmful: Sequence[Batch],
    retain: Sequence[Batch],
    refusal: Sequence[Batch] | None = None,
    config: RestorationConfig | None = None,
    reference_loss: float | None = None,
    all_reduce: AllReduce | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> RestorationResult:
    """Steer a drifted LoRA fine-tune back to the aligned model's harmful loss, in place.

    Args:
        model: a PEFT model; its trainable parameters (the LoRA factors) are updated in place.
        harmful: batches of harmful prompts with harmful completions (``input_ids``, ``attention_mask``,
            ``labels`` with ``-100`` on prompt tokens), as :func:`asft_lightning.data.collate` makes.
        retain: batches of task or benign data whose loss must be kept.
        refusal: optional batches of harmful prompts with refusals (used when ``refusal_weight > 0``).
        config: the settings; default :class:`RestorationConfig`.
        reference_loss: the target ``L_h``; default: ``model`` with its adapter disabled.
        all_reduce: mean across data-parallel ranks, applied to every loss, gradient and HVP (each rank holds
            its own shard of the batches); ``None`` on one process.
        on_step: called with each :class:`StepRecord` (progress bars, logging).

    Returns:
        A :class:`RestorationResult`.
    """
    cfg = resolve_solver(config or RestorationConfig(), distributed=all_reduce is not None)
    if not harmful:
        raise DataError("restore: no harmful batches (harmful data is empty)")
    if not retain:
        raise DataError("restore: no retain batches (retain data is empty)")
    if cfg.refusal_weight > 0 and not refusal:
        raise ArgumentError(f"restore: refusal_weight={cfg.refusal_weight} > 0 needs refusal batches")
    reduce = all_reduce or (lambda t: t)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ArgumentError("restore: the model has no trainable (LoRA) parameters; load the adapter with is_trainable=True")
    if cfg.solver == "fisher" and all_reduce is not None:
        raise ArgumentError("restore: solver 'fisher' runs on one process (its per-example gradients are not "
                            "gathered across ranks); use solver 'cg' or 'lbfgs' under data parallelism")
    # Only Hessian-vector products need an attention kernel with double backward; the Fisher solver takes none.
    needs_hvp = cfg.solver != "fisher" and cfg.hvp_method != "finite_difference"
    attention = cv.second_order_attention(model) if needs_hvp else nullcontext()
    try:
        with attention:
            if cfg.solver != "fisher" and cfg.hvp_method in ("double_backward", "forward_over_reverse"):
                cv.check_second_order(model, cfg.hvp_method)  # raises, naming the attention kernel
            return _restore(model, named, harmful, retain, refusal, cfg, reference_loss, reduce, all_reduce, on_step, start)
    finally:
        model.train(was_training)


def _restore(model, named, harmful, retain, refusal, cfg, reference_loss, reduce, all_reduce, on_step, start):
    params = {k: p.detach() for k, p in named.items()}  # views: follow in-place updates
    harm_fn = _functional(model, harmful)
    task_fn = _functional(model, retain)
    refusal_fn = _functional(model, refusal) if cfg.refusal_weight > 0 else None
    # Gradients and HVPs batch by batch (means of per-batch results): memory of one batch, not of all of them.
    harm_fns = [_functional(model, [b]) for b in harmful]
    task_fns = [_functional(model, [b]) for b in retain]
    refusal_fns = [_functional(model, [b]) for b in refusal] if refusal_fn is not None else None

    def task_and_refusal() -> tuple[float, float | None]:
        with torch.no_grad():
            t = float(reduce(task_fn(params)))
            r = float(reduce(refusal_fn(params))) if refusal_fn else None
        return t, r

    def harmful_loss() -> float:
        with torch.no_grad():
            return float(reduce(harm_fn(params)))

    def harmful_value_and_grad() -> tuple[float, cv.TensorDict]:
        """``L_h`` and the ascent direction ``grad [L_h - mu L_r]`` at the current parameters (one pass)."""
        h, g = _mean_value_and_grad(harm_fns, params)
        if refusal_fns is not None:
            g = cv.axpy(-cfg.refusal_weight, _mean_grad(refusal_fns, params), g)
        return float(reduce(h)), {k: reduce(v) for k, v in g.items()}

    def hessian(v: cv.TensorDict) -> cv.TensorDict:
        """``H_t v`` (averaged across ranks when ``all_reduce`` is given)."""
        out = _mean_hvp(task_fns, params, v, cfg.hvp_method)
        return {k: all_reduce(t) for k, t in out.items()} if all_reduce is not None else out

    if reference_loss is None:
        reference_loss = float(reduce(torch.tensor(reference_harmful_loss(model, harmful))))
    # where a step that overshoots lands: the reference, or just past the stop level when that is at or beyond it
    landing = landing_level(reference_loss, cfg.target_margin)
    h0 = harmful_loss()
    t0, _ = task_and_refusal()
    h, t = h0, t0
    result = RestorationResult(reference_loss, h0, t0, h0, t0, "max_steps", False, config=asdict(cfg))
    if h0 >= reference_loss - cfg.target_margin:
        result.stop_reason, result.restored = "already at the reference level", True
        result.seconds = time.perf_counter() - start
        return result
    if cfg.check_determinism and cfg.solver != "fisher":
        probe = {k: torch.randn_like(v) for k, v in params.items()}
        cv.hvp(task_fns[0], params, probe, method=cfg.hvp_method, check_determinism=True)
    fisher = EmpiricalFisher(per_example_gradients(model, retain, params), cfg.fisher_damping) \
        if cfg.solver == "fisher" else None
    damping = cfg.damping
    history = cv.LBFGSHistory(max_size=cfg.lbfgs_history, damping=cfg.damping)
    for step in range(1, cfg.max_steps + 1):
        t_step = time.perf_counter()
        h_prev, g = harmful_value_and_grad()  # L_h at this point comes with its gradient
        cg_residual = cg_iterations = None
        if cfg.method == "first_order":
            d = g
        elif cfg.solver == "fisher":
            d = fisher.solve(g)
        elif cfg.solver == "cg":
            for _ in range(cfg.max_damping_increases + 1):
                res = cv.conjugate_gradient(hessian, g, damping, max_iter=cfg.cg_max_iter, tol=cfg.cg_tol)
                if not res.negative_curvature:
                    break
                damping *= 4.0  # H_t is indefinite away from a minimum: Levenberg-Marquardt-style increase
            d, cg_residual, cg_iterations = res.solution, res.residual_history[-1], res.iterations
        else:
            gn = float(cv.norm(g))
            if gn > 0:
                history.collect(hessian, [cv.scale(g, 1.0 / gn)])
            d = history.inverse(g)
        touched = sorted(module_groups(list(d)))
        if cfg.top_modules is not None:
            d, touched = select_by_influence(g, d, cfg.top_modules)
        quad = fisher.quadratic(d) if fisher is not None else float(cv.dot(d, cv.axpy(damping, d, hessian(d))))
        ascent = float(cv.dot(g, d))
        if ascent <= 0 or not math.isfinite(ascent):
            result.stop_reason = "no ascent direction (g^T d <= 0)"
            break
        eta = cfg.max_step_size if quad <= 0 else min(cfg.max_step_size, math.sqrt(2 * cfg.trust_region / quad))
        _apply(named, d, eta)
        t, r = task_and_refusal()
        halvings = landing_evals = 0
        while t - t0 > cfg.task_loss_budget and halvings < cfg.backtracks:
            _apply(named, d, -eta / 2)
            eta /= 2
            halvings += 1
            t, r = task_and_refusal()
        over_budget = t - t0 > cfg.task_loss_budget
        if over_budget:
            _apply(named, d, -eta)
            t, r = task_and_refusal()
            h = h_prev
            eta = 0.0
        else:
            # A forward only: a backward here would be wasted on the last step, and under ZeRO-3 a run must not end
            # on a backward (its parameters stay gathered); the next step takes L_h again with its gradient.
            h = harmful_loss()
            if cfg.land_on_target and h > landing and h > h_prev:
                # The trust region allowed more than needed: shorten the step (false position on L_h) to land on
                # the target instead of overshooting it, so that the update stays as small as the target allows.
                at = [eta]

                def loss_at(x: float, at: list[float] = at, d: cv.TensorDict = d) -> float:
                    """Move the parameters to step size ``x`` along ``d``; ``L_h`` there."""
                    _apply(named, d, x - at[0])
                    at[0] = x
                    return harmful_loss()

                eta, h, landing_evals = land(loss_at, (0.0, h_prev), (eta, h), landing,
                                             reference_loss - cfg.target_margin)
                t, r = task_and_refusal()
        record = StepRecord(step, h, t, r, eta, quad, damping, cg_residual, cg_iterations, touched, halvings,
                            time.perf_counter() - t_step, landing_evals)
        result.records.append(record)
        if on_step is not None:
            on_step(record)
        if over_budget:
            result.stop_reason = f"task loss budget {cfg.task_loss_budget} reached (step undone)"
            break
        if h >= reference_loss - cfg.target_margin:
            result.stop_reason, result.restored = "harmful loss back at the reference level", True
            break
    result.final_harmful_loss, result.final_task_loss = h, t
    result.seconds = time.perf_counter() - start
    return result
