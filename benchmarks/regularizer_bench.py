"""Benchmark of the AsFT regulariser: penalty forms, training-step overhead, direction-extraction memory.

Run from the repository root::

    python benchmarks/regularizer_bench.py [--quick] [--out benchmarks/results/regularizer.md]

Every speed or memory figure is reported as a ratio against a baseline measured in the same run:

1. **Penalty micro-benchmark** at Llama-2-7B module shape (``d = 4096``, ``r = 8``, float32, CPU): the dense
   published form (``C = V V^T / ||V||_F`` materialised, ``loss = ||(I - C) @ (B @ A)||_F^2``) against
   ``asft_penalty`` (full ``V``), ``subspace_penalty`` (``k = 256``), ``lowrank_penalty`` (the Safe LoRA ``C``
   kept as its top-``k`` eigenpairs) and ``inside_energy`` (the ``inside`` anchor's term ``||U_k U_k^T B A||_F^2``
   with ``k = 32``, what ``ModuleDirection.inside_energy`` computes). Forward+backward median time, bytes stored,
   and the peak resident-memory increase of one forward+backward, each variant in its own subprocess; every
   factored form is checked in float64 against the dense formula of the same quantity.
2. **Step-time overhead** of :class:`asft_lightning.module.AsFTModule` with ``lam = 1`` against ``lam = 0`` (and
   ``lam = 0`` with the anchor against no direction at all) on a randomly initialised SmolLM2-135M-shaped Llama,
   full steps (forward, loss, backward, AdamW) on a fixed synthetic batch, interleaved. Two ``lam = 1`` variants:
   the default ``projector`` anchor with the full-``V`` file of section 3, and ``anchor = "inside"`` with a
   rank-32 subspace file (``extract_direction(..., projector="subspace", rank=32, reference="base")``) of the same
   checkpoint pair; ``--inside_k 8`` runs both sections at the ``harm_subspace`` anchor's rank (the same
   ``inside_energy`` term, so the same cost at the same ``k``).
3. **Direction-extraction peak memory** of :func:`asft_lightning.direction.extract_direction` on a multi-shard
   checkpoint pair, against the sum of both checkpoints' sizes.

Peak memory is read from Linux's per-process resident-set high-water mark (``VmHWM`` in ``/proc/self/status``,
the figure ``getrusage().ru_maxrss`` reports). Where the kernel allows it, the mark is reset to the current
resident size (``echo 5 > /proc/self/clear_refs``) just before the measured region, so "peak increase" is the
largest number of extra resident pages (anonymous memory, plus file pages mapped by the process) touched at any
moment of that region; otherwise the figure is the difference of two ``ru_maxrss`` readings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    SMOLLM2_135M,
    OtherLoad,
    PeakProbe,
    busy_processes,
    command_line,
    fmt_bytes,
    fmt_time,
    git_state,
    hwm_bytes,
    interleaved,
    load_average,
    machine,
    maxrss_bytes,
    median_time,
    rss_bytes,
    run_worker,
    sampled_time,
    table,
    targets_table,
    tensor_bytes,
    write_report,
)

#: Default ``k`` of the ``inside`` anchor's basis in both sections (the rebuilt SmolLM2 world's runs use ``--rank 32``;
#: ``--inside_k 8`` measures the ``harm_subspace`` anchor's size, the same ``inside_energy`` term).
INSIDE_RANK = 32
#: Rank of the synthetic alignment perturbation of every q_proj / v_proj (section 2/3's ``aligned`` checkpoint):
#: at least ``INSIDE_RANK``, else ``extract_direction`` caps the basis at the direction's numerical rank.
ALIGN_RANK = 32


# ============================================================================ 1. penalty micro-benchmark
def spectrum(kind: str, d: int):
    """Singular values of the synthetic direction ``V`` (float64), largest first."""
    import torch

    i = torch.arange(d, dtype=torch.float64)
    if kind.startswith("exp"):
        return torch.exp(-i / float(kind[3:]))
    if kind.startswith("pow"):
        return (i + 1) ** -float(kind[3:])
    if kind == "flat":
        return torch.ones(d, dtype=torch.float64)
    raise ValueError(kind)


def c_truncation_error(s, k: int) -> float:
    """``||C - C_k||_F / ||C||_F`` for ``C = V V^T / ||V||_F`` with singular values ``s``: eigenvalues ``s^2/||V||``."""
    s4 = s.double() ** 4
    return float((s4[k:].sum() / s4.sum()).sqrt())


def dense_loss(A, B, P):
    """The published form with ``P = I - C`` materialised: ``||P @ (B @ A)||_F^2``.

    Written as ``square().sum()``: ``torch.linalg.matrix_norm`` (and ``torch.norm``) of a 4096 x 4096 float32
    matrix accumulates with a relative error of ~1e-3 on this CPU build (the report measures it).
    """
    return (P @ (B @ A)).square().sum()


def dense_residual_projector(V):
    """``P = I - C`` with the published ``C = V V^T / ||V||_F`` materialised (``d_out x d_out``), built in place.

    The one-time build of the published dense form (also used by ``gpu_bench.py``).
    """
    import torch

    P = V @ V.mT
    P.div_(torch.linalg.vector_norm(V))
    P.neg_()
    P.diagonal().add_(1.0)
    return P


def penalty_fn(variant: str, tensors: dict[str, Any]):
    """``(A, B) -> loss`` for one variant, closing over its stored tensors."""
    from asft_lightning import regularizers as R

    if variant == "dense":
        P = tensors["P"]
        return lambda A, B: dense_loss(A, B, P)
    if variant == "full":
        V, norm = tensors["V"], tensors["norm"]
        return lambda A, B: R.asft_penalty(A, B, V, norm)
    if variant == "subspace":
        U = tensors["U"]
        return lambda A, B: R.subspace_penalty(A, B, U)
    if variant == "lowrank":
        U, w = tensors["U"], tensors["w"]
        return lambda A, B: R.lowrank_penalty(A, B, U, w)
    if variant == "inside":
        # the package's own term: ModuleDirection.inside_energy (anchors inside / harm_subspace) calls it
        U_in = tensors["U_inside"]
        return lambda A, B: R.inside_energy(A, B, U_in)
    raise ValueError(variant)


def dense_inside_loss(A, B, U):
    """The ``inside`` anchor's term with the projector materialised: ``||(U U^T) @ (B @ A)||_F^2``.

    The reference the factored :func:`asft_lightning.regularizers.inside_energy` is checked against; builds a
    ``d_out x d_out`` matrix, so only for checks.
    """
    return dense_loss(A, B, U @ U.mT)


def fwd_bwd(fn, A, B):
    A.grad = None
    B.grad = None
    loss = fn(A, B)
    loss.backward()
    return loss


def worker_penalty(opts: argparse.Namespace) -> dict[str, Any]:
    """Subprocess: load one variant's inputs, measure build (dense), one fwd+bwd's peak memory, then time it."""
    import torch

    data = torch.load(Path(opts.inputs) / "inputs.pt", weights_only=True)
    A = data["A"].clone().requires_grad_(True)
    B = data["B"].clone().requires_grad_(True)
    out: dict[str, Any] = {"variant": opts.variant}
    if opts.variant == "dense":
        V = data["V"].clone()
        del data
        # One-time build, as the published code does it: C = V V^T / ||V||_F (then P = I - C, in place).
        with PeakProbe() as probe:
            t0 = time.perf_counter()
            P = dense_residual_projector(V)
            out["build_time"] = time.perf_counter() - t0
        out["build_peak_increase"] = probe.peak_increase
        del V
        tensors = {"P": P}
    elif opts.variant == "full":
        tensors = {"V": data["V"].clone(), "norm": data["norm"].clone()}
    elif opts.variant == "subspace":
        tensors = {"U": data["U"].clone()}
    elif opts.variant == "inside":
        tensors = {"U_inside": data["U_inside"].clone()}
    else:
        tensors = {"U": data["U"].clone(), "w": data["w"].clone()}
    data = None
    gc.collect()
    out["stored_bytes"] = tensor_bytes(*tensors.values())
    fn = penalty_fn(opts.variant, tensors)
    fwd_bwd(fn, A, B)  # warm-up (allocator, thread pool, kernels)
    A.grad = B.grad = None
    with PeakProbe() as probe:
        t0 = time.perf_counter()
        loss = fwd_bwd(fn, A, B)
        first = time.perf_counter() - t0
    out["peak_reset_ok"] = probe.reset
    out["fwd_bwd_peak_increase"] = probe.peak_increase
    out["loss"] = float(loss)
    # Timing: each sample is the mean of `inner` calls, chosen so a sample lasts >= ~0.2 s.
    inner, samples = sampled_time(lambda: fwd_bwd(fn, A, B), opts.reps, first)
    out.update(inner=inner, samples=samples, median=statistics.median(samples))
    if opts.variant == "full":
        # Where the full form's time goes: the skinny products with the 4096 x 4096 V, by memory layout.
        V, b = tensors["V"], B.detach()
        x = torch.randn(V.shape[1], b.shape[1])
        out["kernels"] = {
            "V.mT @ B (as in safelora_apply)": median_time(lambda: V.mT @ b),
            "(B.mT @ V).mT (same product)": median_time(lambda: (b.mT @ V).mT),
            "V @ x": median_time(lambda: V @ x),
            "V.sum() (one read of V)": median_time(lambda: V.sum()),
        }
    return out


def worker_baseline(opts: argparse.Namespace) -> dict[str, Any]:
    """Subprocess that imports what the extraction worker imports and does nothing else."""
    import torch  # noqa: F401

    from asft_lightning import checkpoints, direction  # noqa: F401

    gc.collect()
    return {"maxrss": maxrss_bytes(), "hwm": hwm_bytes(), "rss": rss_bytes()}


def worker_extract(opts: argparse.Namespace) -> dict[str, Any]:
    """Subprocess: run extract_direction once and report the process's peak RSS."""
    import torch  # noqa: F401

    from asft_lightning import checkpoints, direction  # noqa: F401

    gc.collect()
    before = {"maxrss": maxrss_bytes(), "hwm": hwm_bytes(), "rss": rss_bytes()}
    with PeakProbe() as probe:
        t0 = time.perf_counter()
        ds = direction.extract_direction(
            opts.aligned, opts.unaligned, opts.output, projector="safelora", dtype="float32"
        )
        elapsed = time.perf_counter() - t0
    return {
        "before": before,
        "maxrss": maxrss_bytes(),
        "hwm": hwm_bytes(),
        "call_peak_increase": probe.peak_increase,
        "peak_reset_ok": probe.reset,
        "time": elapsed,
        "modules": len(ds.modules),
    }


def penalty_section(opts: argparse.Namespace, work: Path, log) -> dict[str, Any]:
    import torch

    from asft_lightning import regularizers as R

    d, r, k, k_in, spec_kind = opts.dim, 8, opts.rank_k, opts.inside_k, "exp200"
    torch.manual_seed(0)
    res: dict[str, Any] = {"d": d, "r": r, "k": k, "k_inside": k_in}
    res["spectrum"] = "s_i = c * exp(-i / 200), i = 0..d-1"

    # --- synthetic direction with a known spectrum: V = U diag(s) W^T, U and W random orthogonal.
    t0 = time.perf_counter()
    # float32 QR (half the time of float64); orthogonal to ~1e-6, so the spectrum is exact to that level.
    U_full = torch.linalg.qr(torch.randn(d, d))[0].double()
    W_full = torch.linalg.qr(torch.randn(d, d))[0].double()
    s = spectrum(spec_kind, d)
    # Scale so that the published C has top eigenvalue 1 (s_0^2 / ||V||_F = 1), i.e. C acts like a projector on
    # its leading direction and the penalty visibly differs from ||B A||_F^2.
    s = s * (s.square().sum().sqrt() / s[0] ** 2)
    V64 = (U_full * s) @ W_full.mT
    norm64 = torch.linalg.vector_norm(V64)
    log(f"  built V ({d}x{d}, known spectrum) in {time.perf_counter() - t0:.1f} s")

    # --- the low-rank eigenpairs: through the library's own SVD path (default mode) or from the construction.
    if opts.quick:
        Uk64, s_top = U_full[:, :k], s[:k]
        res["eigenpairs_from"] = "the construction (U[:, :k], s[:k]); --quick skips the SVD"
        res["svd_time"] = None
    else:
        from asft_lightning.direction import _top_basis

        t0 = time.perf_counter()
        # what extract_direction does (float64 SVD); it also returns the right singular vectors, unused here
        Uk64, _, s_svd = _top_basis(V64.float(), k, None)
        res["svd_time"] = time.perf_counter() - t0
        s_top = s_svd[:k]
        res["svd_sv_rel_err"] = float((s_svd - s).abs().max() / s[0])
        res["eigenpairs_from"] = (
            "asft_lightning.direction._top_basis (the float64 SVD extract_direction runs)"
        )
        log(f"  SVD (extract_direction's path) in {res['svd_time']:.1f} s")
    w64 = s_top.square() / norm64

    # --- truncation error of C at k: measured on the matrices, and the closed form from the spectrum.
    C64 = V64 @ V64.mT / norm64
    Ck64 = (Uk64 * w64) @ Uk64.mT
    res["trunc_err_measured"] = float(torch.linalg.matrix_norm(C64 - Ck64) / torch.linalg.matrix_norm(C64))
    res["trunc_err_closed"] = c_truncation_error(s, k)
    res["trunc_err_other_spectra"] = {
        kind: c_truncation_error(spectrum(kind, d), k)
        for kind in ("exp50", "exp200", "exp1000", "pow0.5", "pow0.25", "flat")
    }
    res["v_energy_kept"] = float(s[:k].square().sum() / s.square().sum())
    res["c_top_eig"] = float(s[0] ** 2 / norm64)
    del C64, Ck64

    # --- LoRA factors: B half inside V's top-64 left singular subspace, half random; A random.
    gen = torch.Generator().manual_seed(1)
    B64 = U_full[:, :64] @ torch.randn(64, r, generator=gen, dtype=torch.float64) / 8 + torch.randn(
        d, r, generator=gen, dtype=torch.float64
    ) / math.sqrt(d)
    A64 = torch.randn(r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)

    f32 = torch.float32
    inputs = {
        "A": A64.to(f32).contiguous(),
        "B": B64.to(f32).contiguous(),
        "V": V64.to(f32).contiguous(),
        "norm": norm64.to(f32),
        "U": Uk64.to(f32).contiguous(),
        "w": w64.to(f32).contiguous(),
        # the inside anchor's basis: V's top-k_in left singular vectors (orthonormal columns)
        "U_inside": Uk64[:, :k_in].to(f32).contiguous(),
    }
    torch.save(inputs, work / "inputs.pt")
    del U_full, W_full, V64

    # --- numerical agreement. Reference: the dense form of the same projector in float64. Each factored form is
    # evaluated in float64 (mathematical exactness) and in float32 (as benchmarked).
    def grads(fn, tensors, dtype):
        A = tensors["A"].to(dtype).clone().requires_grad_(True)
        B = tensors["B"].to(dtype).clone().requires_grad_(True)
        loss = fwd_bwd(fn, A, B)
        return float(loss.detach()), torch.cat([A.grad.flatten(), B.grad.flatten()]).double()

    def rel(x, ref):
        return abs(x[0] - ref[0]) / abs(ref[0]), float(
            torch.linalg.vector_norm(x[1] - ref[1]) / torch.linalg.vector_norm(ref[1])
        )

    t0 = time.perf_counter()
    in64 = {key: t.double() for key, t in inputs.items()}
    P64 = -(in64["V"] @ in64["V"].mT / in64["norm"])
    P64.diagonal().add_(1.0)
    ref_pub = grads(penalty_fn("dense", {"P": P64}), in64, torch.float64)
    P32 = P64.float()
    dense32 = grads(penalty_fn("dense", {"P": P32}), inputs, torch.float32)
    with torch.no_grad():
        norm32 = float(torch.linalg.matrix_norm(P32 @ (inputs["B"] @ inputs["A"])).square())
    res["dense32_rel"] = rel(dense32, ref_pub)
    res["matrix_norm32_rel"] = abs(norm32 - ref_pub[0]) / ref_pub[0]
    del P64, P32
    P64 = -(in64["U"] @ in64["U"].mT)
    P64.diagonal().add_(1.0)
    ref_sub = grads(penalty_fn("dense", {"P": P64}), in64, torch.float64)
    del P64
    # inside_energy computes ||U U^T X||_F as ||U^T X||_F, exact for orthonormal U only; the float32-stored basis
    # is orthonormal to ~1e-7, so the float64 check runs on its float64 re-orthonormalisation (the same span).
    U_in64 = in64["U_inside"]
    eye = torch.eye(U_in64.shape[1], dtype=torch.float64)
    res["inside_basis_orth_err"] = float((U_in64.mT @ U_in64 - eye).abs().max())
    U_in64 = in64["U_inside"] = torch.linalg.qr(U_in64)[0]
    ref_in = grads(lambda A, B: dense_inside_loss(A, B, U_in64), in64, torch.float64)
    energy = float(R.update_energy(in64["A"], in64["B"]))
    checks = {}
    references = {
        "full": ("dense published C", ref_pub),
        "lowrank": ("dense published C", ref_pub),
        "subspace": ("dense I - U_k U_k^T", ref_sub),
        "inside": (f"dense U_k U_k^T, k={k_in}", ref_in),
    }
    for variant, (ref_name, ref) in references.items():
        r64 = rel(grads(penalty_fn(variant, in64), in64, torch.float64), ref)
        x32 = grads(penalty_fn(variant, inputs), inputs, torch.float32)
        r32 = rel(x32, ref)
        checks[variant] = {
            "reference": ref_name,
            "loss": x32[0],
            "ref_loss": ref[0],
            "loss_rel_64": r64[0],
            "grad_rel_64": r64[1],
            "loss_rel_32": r32[0],
            "grad_rel_32": r32[1],
        }
    del in64
    res["checks"] = checks
    res["ba_energy"] = energy
    res["projector_share_pub"] = 1 - ref_pub[0] / energy
    res["projector_share_sub"] = 1 - ref_sub[0] / energy
    res["inside_share"] = ref_in[0] / energy
    log(f"  numerical checks in {time.perf_counter() - t0:.1f} s")

    # --- timing and memory, one subprocess per variant.
    runs = {}
    for variant in ("dense", "full", "subspace", "lowrank", "inside"):
        t0 = time.perf_counter()
        reps = opts.dense_reps if variant == "dense" else opts.reps
        runs[variant] = run_worker(
            __file__, ["penalty", "--variant", variant, "--inputs", str(work), "--reps", str(reps)], opts.threads
        )
        log(f"  {variant}: median {fmt_time(runs[variant]['median'])} ({time.perf_counter() - t0:.1f} s)")
    res["runs"] = runs
    res["c_bytes"] = d * d * 4
    (work / "inputs.pt").unlink()
    return res


def penalty_report(res: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, str, bool]]]:
    d, k, k_in = res["d"], res["k"], res["k_inside"]
    runs = res["runs"]
    dense = runs["dense"]
    c_bytes = res["c_bytes"]
    dense_total = dense["stored_bytes"] + dense["fwd_bwd_peak_increase"]
    names = {
        "dense": "dense published: `P = I - C` stored, `||P @ (B @ A)||_F^2`",
        "full": "`asft_penalty` (full V + its norm)",
        "subspace": f"`subspace_penalty` (U_k, k={k})",
        "lowrank": f"`lowrank_penalty` (Safe LoRA C as top-{k} eigenpairs)",
        "inside": f"`inside_energy` (anchor `inside`: U_k U_k^T B A, k={k_in})",
    }
    lines = [
        f"Shape {d} x {d}, r = {res['r']}, float32, CPU. Synthetic direction `V = U diag(s) W^T` with U, W random",
        f"orthogonal and {res['spectrum']}, scaled so the published `C = V V^T / ||V||_F` has top eigenvalue "
        f"{res['c_top_eig']:.3f}. LoRA factors: `B` half inside V's top-64 singular subspace, half random; `A` random.",
        f"Low-rank eigenpairs from {res['eigenpairs_from']}"
        + (
            f" (one-time cost {fmt_time(res['svd_time'])}; singular values match the construction to "
            f"{res['svd_sv_rel_err']:.1e} of s_0)."
            if res.get("svd_time")
            else "."
        ),
        "",
        *table(
            ["form", "stored", "stored / C", "fwd+bwd median", "speedup vs dense", "fwd+bwd peak RSS increase",
             "(stored + peak) / dense"],
            ([names[v], f"{fmt_bytes(x['stored_bytes'])} ({x['stored_bytes']} B)", f"{x['stored_bytes'] / c_bytes:.6f}",
              fmt_time(x["median"]), f"{dense['median'] / x['median']:.1f}x", fmt_bytes(x["fwd_bwd_peak_increase"]),
              f"{(x['stored_bytes'] + x['fwd_bwd_peak_increase']) / dense_total:.4f}"]
             for v, x in runs.items()),
        ),
        "",
        f"Timing: median over {len(dense['samples'])} samples for dense (1 call each) and {len(runs['full']['samples'])} "
        "samples for the others (each sample the mean of enough calls to last >= 0.2 s: "
        + ", ".join(f"{v} {runs[v]['inner']}" for v in ("full", "subspace", "lowrank", "inside"))
        + "), after one warm-up call; each form runs in its own fresh subprocess.",
        "Inside the full form (`asft_penalty`), medians of single products with the same V: "
        + ", ".join(f"{name} {fmt_time(t)}" for name, t in runs["full"]["kernels"].items())
        + ".",
        f"Dense one-time build of `C` (and `I - C` in place), outside the timed region: {fmt_time(dense['build_time'])}, "
        f"peak RSS increase {fmt_bytes(dense['build_peak_increase'])} (C itself is {fmt_bytes(c_bytes)}).",
        "Peak memory: increase of the resident high-water mark (VmHWM) over one forward+backward, measured after a "
        "warm-up call with the mark reset to the current RSS "
        + (
            "(reset succeeded in every subprocess)."
            if all(x["peak_reset_ok"] for x in runs.values())
            else "(reset NOT permitted: figures are ru_maxrss differences and can read 0 when an earlier peak was higher)."
        )
        + " Resolution is one 4 KiB page; the stored tensors are counted separately in the 'stored' column.",
        "'stored' counts the tensors each penalty function is given (dense: `I - C`; full: V and ||V||_F; "
        f"subspace: U_k; low-rank Safe LoRA: U_k and its k eigenvalues; inside: U_k with k={k_in}). A "
        "`ModuleDirection` also keeps the 4-byte "
        "||V||_F scalar for every form.",
        "",
        f"Truncation of the Safe LoRA `C` at k = {k} (relative Frobenius error `||C - C_k||_F / ||C||_F`): "
        f"**{res['trunc_err_measured']:.4f}** measured on the matrices, {res['trunc_err_closed']:.4f} from the "
        f"spectrum in closed form; V's energy kept in the top {k} singular values: {res['v_energy_kept']:.4f}. "
        f"The same error for other spectra (closed form, d = {d}): "
        + ", ".join(f"{_spec_name(kind)} {err:.3f}" for kind, err in res["trunc_err_other_spectra"].items())
        + ".",
        "",
        "Agreement with the dense form of the same projector evaluated in float64 (relative differences of the "
        "penalty and of the gradient w.r.t. (A, B)); each factored form evaluated in float64 and in float32:",
        "",
        *table(
            ["form", "reference", "penalty (fp32)", "reference penalty", "penalty diff fp64", "grad diff fp64",
             "penalty diff fp32", "grad diff fp32"],
            [*([v, c["reference"], f"{c['loss']:.6g}", f"{c['ref_loss']:.6g}", f"{c['loss_rel_64']:.1e}",
                f"{c['grad_rel_64']:.1e}", f"{c['loss_rel_32']:.1e}", f"{c['grad_rel_32']:.1e}"]
               for v, c in res["checks"].items()),
             ["dense published, float32 (as timed)", "dense published C", "", "", "", "",
              f"{res['dense32_rel'][0]:.1e}", f"{res['dense32_rel'][1]:.1e}"]],
        ),
        "",
        f"`||B A||_F^2` = {res['ba_energy']:.6g}; the published C removes {100 * res['projector_share_pub']:.1f}% of it "
        f"and `I - U_k U_k^T` removes {100 * res['projector_share_sub']:.1f}%; {100 * res['inside_share']:.1f}% of "
        f"it lies inside the top-{k_in} subspace (the `inside` term), so the checks are not vacuous. "
        f"`inside_energy` evaluates `||U_k U_k^T B A||_F` as `||U_k^T B A||_F`, exact for orthonormal `U_k` only: "
        f"the float32 basis has `max|U_k^T U_k - I|` = {res['inside_basis_orth_err']:.1e}, so its float64 row uses "
        "the basis re-orthonormalised in float64 (QR, same span) and its float32 row the float32 basis as timed. "
        f"Side finding: the same dense penalty written with `torch.linalg.matrix_norm(...)**2` in float32 is off by "
        f"{res['matrix_norm32_rel']:.1e} (relative) on this build, hence `square().sum()` in the timed dense form.",
    ]
    full_speed = dense["median"] / runs["full"]["median"]
    targets = [
        (
            "`asft_penalty` (full V) fwd+bwd speedup vs dense",
            ">= 10x",
            f"{full_speed:.1f}x",
            full_speed >= 10,
        ),
    ]
    for v in ("subspace", "lowrank"):
        sp = dense["median"] / runs[v]["median"]
        frac = runs[v]["stored_bytes"] / c_bytes
        targets.append((f"`{v}_penalty` k={k} speedup vs dense", ">= 100x", f"{sp:.0f}x", sp >= 100))
        targets.append(
            (f"`{v}_penalty` k={k} storage / C", "<= 1/16 = 0.0625", f"{frac:.6f}", frac <= 1 / 16)
        )
    sp = dense["median"] / runs["inside"]["median"]
    targets.append(
        (f"`inside_energy` (anchor inside) k={k_in} speedup vs dense", ">= 100x", f"{sp:.0f}x", sp >= 100)
    )
    c = res["checks"]
    for v, what, ref in (
        ("full", "full form", "dense published C"),
        ("subspace", "subspace form", "dense `I - U_k U_k^T`"),
        ("inside", "inside form", f"dense `U_k U_k^T`, k={k_in}"),
    ):
        worst = max(c[v]["loss_rel_64"], c[v]["grad_rel_64"])
        targets.append((f"{what} equals {ref} (float64)", "rel. diff < 1e-10", f"{worst:.1e}", worst < 1e-10))
    lr = max(c["lowrank"]["loss_rel_64"], c["lowrank"]["grad_rel_64"])
    targets.append(
        (
            "low-rank Safe LoRA C agrees with dense within the truncation error (float64)",
            f"rel. diff <= {res['trunc_err_measured']:.3f}",
            f"{lr:.1e}",
            lr <= res["trunc_err_measured"],
        )
    )
    return lines, targets


def _spec_name(kind: str) -> str:
    if kind.startswith("exp"):
        return f"exp(-i/{kind[3:]})"
    if kind.startswith("pow"):
        return f"(i+1)^-{kind[3:]}"
    return "flat (all equal)"


# ======================================================================= 2./3. SmolLM2-shaped model world
def build_checkpoints(work: Path, opts: argparse.Namespace, log) -> dict[str, Any]:
    """Random SmolLM2-135M-shaped Llama (``base``) and an ``aligned`` copy with rank-``ALIGN_RANK`` q/v updates."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dict(SMOLLM2_135M)
    if opts.layers is not None:
        cfg["num_hidden_layers"] = opts.layers
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    n_params = sum(p.numel() for p in model.parameters())
    base = work / "base"
    aligned = work / "aligned"
    model.save_pretrained(base, max_shard_size=opts.shard_size)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                left = torch.randn(p.shape[0], ALIGN_RANK, generator=gen)
                right = torch.randn(ALIGN_RANK, p.shape[1], generator=gen)
                delta = left @ right
                p.add_(delta * (0.05 * torch.linalg.vector_norm(p) / torch.linalg.vector_norm(delta)))
    model.save_pretrained(aligned, max_shard_size=opts.shard_size)
    del model
    gc.collect()

    def size(p: Path) -> tuple[int, int]:
        files = sorted(p.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files), len(files)

    (bs, bn), (as_, an) = size(base), size(aligned)
    log(f"  built and saved base + aligned checkpoints in {time.perf_counter() - t0:.1f} s")
    return {
        "base": str(base),
        "aligned": str(aligned),
        "params": n_params,
        "layers": cfg["num_hidden_layers"],
        "base_bytes": bs,
        "base_shards": bn,
        "aligned_bytes": as_,
        "aligned_shards": an,
    }


def extraction_section(world: dict[str, Any], work: Path, opts: argparse.Namespace, log) -> dict[str, Any]:
    out_file = work / "direction.safetensors"
    t0 = time.perf_counter()
    base_run = run_worker(__file__, ["baseline"], opts.threads)
    ext = run_worker(
        __file__,
        ["extract", "--aligned", world["aligned"], "--unaligned", world["base"], "--output", str(out_file)],
        opts.threads,
    )
    log(f"  extraction subprocess done in {time.perf_counter() - t0:.1f} s")
    return {
        "baseline": base_run,
        "extract": ext,
        "direction_file": str(out_file),
        "direction_bytes": out_file.stat().st_size,
    }


def inside_direction(world: dict[str, Any], work: Path, rank: int, log) -> dict[str, Any]:
    """The ``inside`` anchor's direction file for section 2: a base-reference subspace basis of the world's pair.

    What ``asft direction --projector subspace --rank <rank> --reference base`` writes, made in-process
    (section 3 measures the extraction's memory; this file only feeds the step benchmark).
    """
    from asft_lightning.direction import extract_direction

    out_file = work / "direction_inside.safetensors"
    t0 = time.perf_counter()
    ds = extract_direction(
        world["aligned"],
        world["base"],
        str(out_file),
        projector="subspace",
        rank=rank,
        reference="base",
        dtype="float32",
        hash_inputs=False,
    )
    ranks = sorted({md.basis.shape[1] for md in ds.modules.values()})
    log(f"  inside direction (subspace, rank {rank}, kept k {ranks}): {time.perf_counter() - t0:.1f} s")
    return {"file": str(out_file), "kept_ranks": ranks, "modules": len(ds.modules)}


def extraction_report(
    world: dict[str, Any], res: dict[str, Any]
) -> tuple[list[str], list[tuple[str, str, str, bool]]]:
    both = world["base_bytes"] + world["aligned_bytes"]
    ext, base = res["extract"], res["baseline"]
    inc = ext["hwm"] - base["hwm"]
    ratio = inc / both
    lines = [
        f"Checkpoint pair: random SmolLM2-135M-shaped Llama ({world['params'] / 1e6:.1f} M parameters, "
        f"{world['layers']} layers, float32) saved with `save_pretrained(max_shard_size=...)`: base "
        f"{fmt_bytes(world['base_bytes'])} in {world['base_shards']} shards, aligned copy (rank-{ALIGN_RANK} "
        f"perturbation of every q_proj/v_proj, 5% of the weight's norm) {fmt_bytes(world['aligned_bytes'])} in "
        f"{world['aligned_shards']} shards.",
        f"`extract_direction(aligned, base, projector='safelora', dtype='float32')` (default `hash_inputs=True`, "
        f"`spectrum_size=8`) wrote {ext['modules']} modules, {fmt_bytes(res['direction_bytes'])}, in "
        f"{fmt_time(ext['time'])}, in a fresh subprocess.",
        "",
        *table(["quantity", "value"], [
            ["peak RSS (VmHWM) of the extraction subprocess", fmt_bytes(ext["hwm"])],
            ["peak RSS (VmHWM) of a subprocess that only imports the same modules", fmt_bytes(base["hwm"])],
            ["extraction's peak RSS above that baseline", fmt_bytes(inc)],
            ["peak RSS increase over the `extract_direction` call alone (mark reset just before)",
             fmt_bytes(ext["call_peak_increase"]) + ("" if ext["peak_reset_ok"] else " (reset not permitted)")],
            ["sum of both checkpoints' file sizes", fmt_bytes(both)],
            ["**ratio (peak above baseline) / (both checkpoints)**", f"**{ratio:.3f}**"],
            ["ratio (peak above baseline) / (written direction file)", f"{inc / res['direction_bytes']:.2f}"],
        ]),
        "",
        "Why VmHWM and not `ru_maxrss`: a child's `ru_maxrss` inherits the peak of the parent process it was "
        "spawned from (Linux folds the pre-exec memory's high-water mark into it), so in this harness it read "
        f"{fmt_bytes(ext['maxrss'])} for the extraction and {fmt_bytes(base['maxrss'])} for the import-only "
        "baseline, i.e. the parent's peak. VmHWM is the same high-water mark for the process's own memory only. "
        "It counts anonymous memory and file pages mapped into the process (safetensors memory-maps the shards); "
        "page-cache pages read by the `sha256` input hashing through `read()` are not resident in the process.",
    ]
    return lines, [
        (
            "direction extraction peak RSS / both checkpoints",
            "well below 1 (met if < 0.25)",
            f"{ratio:.3f}",
            ratio < 0.25,
        )
    ]


# ==================================================================================== 2. step overhead
def step_section(
    world: dict[str, Any], direction_file: str, inside_file: str, opts: argparse.Namespace, log
) -> dict[str, Any]:
    """Interleaved full training steps of four ``AsFTModule`` variants on the same batch.

    Args:
        world: the checkpoint pair from :func:`build_checkpoints`.
        direction_file: the full-``V`` file of section 3 (default ``projector`` anchor, ``lam`` 1 and 0).
        inside_file: the base-reference subspace file of :func:`inside_direction` (``anchor="inside"``, ``lam`` 1).
        opts: the run's sizes (``batch``, ``seq``, ``step_reps``, ``step_warmup``, ``profile``).
        log: progress printer.
    """
    import torch

    from asft_lightning.module import AsFTModule

    torch.manual_seed(0)
    t0 = time.perf_counter()
    variants = {
        "lam1": dict(direction=direction_file, lam=1.0),
        "inside": dict(direction=inside_file, lam=1.0, anchor="inside"),
        "lam0": dict(direction=direction_file, lam=0.0),
        "none": dict(direction=None, lam=0.0),
    }
    mods, opts_ = {}, {}
    for key, kw in variants.items():
        torch.manual_seed(0)
        m = AsFTModule(model=world["base"], **kw)
        m.configure_model()
        m.train()
        mods[key] = m
        opts_[key] = m.configure_optimizers()
    log(f"  loaded {len(mods)} modules in {time.perf_counter() - t0:.1f} s")

    gen = torch.Generator().manual_seed(3)
    bsz, seq = opts.batch, opts.seq
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (bsz, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step(key: str) -> None:
        """One training step."""
        m, o = mods[key], opts_[key]
        o.zero_grad(set_to_none=True)
        m._step(batch, with_grad=True)["loss"].backward()
        o.step()

    t0 = time.perf_counter()
    times, cpu = interleaved({key: (lambda key=key: step(key)) for key in variants}, opts.step_reps, opts.step_warmup)
    log(f"  {opts.step_reps} interleaved reps x {len(variants)} variants in {time.perf_counter() - t0:.1f} s")
    with torch.no_grad():
        final = mods["lam1"]._step(batch, with_grad=False)
        final_inside = mods["inside"]._step(batch, with_grad=False)
    isolated = {
        "with_grad": median_time(lambda: anchor_work(mods["lam1"], True), 9),
        "inside_with_grad": median_time(lambda: anchor_work(mods["inside"], True), 9),
        "value_only": median_time(lambda: anchor_work(mods["lam0"], False), 9),
    }
    trainable = sum(p.numel() for p in mods["lam1"].parameters() if p.requires_grad)
    res = {
        "batch": bsz,
        "seq": seq,
        "times": times,
        "median": {k: statistics.median(v) for k, v in times.items()},
        "paired_lam1_lam0": paired_ratio(times, "lam1", "lam0"),
        "paired_lam0_none": paired_ratio(times, "lam0", "none"),
        "paired_lam1_none": paired_ratio(times, "lam1", "none"),
        "paired_inside_lam0": paired_ratio(times, "inside", "lam0"),
        "paired_inside_none": paired_ratio(times, "inside", "none"),
        "min": {k: min(v) for k, v in times.items()},
        "cpu": cpu,
        "cpu_median": {k: statistics.median(v) for k, v in cpu.items()},
        "isolated": isolated,
        "final_penalty": float(final.get("penalty", float("nan"))),
        "final_drift": float(final.get("drift_ratio", float("nan"))),
        "final_penalty_inside": float(final_inside.get("penalty", float("nan"))),
        "lora_modules": len(mods["lam1"].anchor.layers) if mods["lam1"].anchor else 0,
        "trainable": trainable,
        "modules": mods,
    }
    if opts.profile:
        res["profile"] = profile_steps(mods, opts_, batch)
    return res


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over the interleaved repeats of ``times[num][i] / times[den][i]`` (same rotation, same moment)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def anchor_work(module, with_grad: bool) -> None:
    """What the anchor's forward hooks compute for one step, for every LoRA layer, outside the model.

    Mirrors ``LoraAnchor._make_hook``: the penalty on detached factors, its gradient when ``lam > 0``, and the
    drift statistics (the update energy, and for anchors other than ``projector`` / ``normalized`` the file's own
    ``||(I - C) B A||^2``). Uses the anchor's own (private) placed directions.
    """
    import torch

    from asft_lightning.regularizers import update_energy

    anchor = module.anchor
    for name, layer in anchor.layers.items():
        adapter = layer.active_adapters[0]
        wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        md = anchor._placed_direction(name, wa)
        with torch.enable_grad():
            a = wa.detach().requires_grad_(with_grad)
            b = wb.detach().requires_grad_(with_grad)
            raw = anchor.penalty_fn(md, a, b)
            if with_grad:
                torch.autograd.grad(raw, (a, b))
        with torch.no_grad():
            update_energy(a.detach(), b.detach())
            if anchor.anchor not in ("projector", "normalized"):
                md.penalty(a.detach(), b.detach())


def profile_steps(mods, optims, batch) -> dict[str, str]:
    """torch.profiler tables (self CPU time) of one lam=1 (projector and inside) and one lam=0 step."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for key in ("lam1", "inside", "lam0"):
        m, o = mods[key], optims[key]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            o.zero_grad(set_to_none=True)
            m._step(batch, with_grad=True)["loss"].backward()
            o.step()
        tables[key] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return tables


def step_report(
    res: dict[str, Any], world: dict[str, Any]
) -> tuple[list[str], list[tuple[str, str, str, bool]]]:
    med, mn, iso, cm = res["median"], res["min"], res["isolated"], res["cpu_median"]
    r10 = med["lam1"] / med["lam0"]
    r0n = med["lam0"] / med["none"]
    ri0 = med["inside"] / med["lam0"]
    rin = med["inside"] / med["none"]
    ci0 = cm["inside"] / cm["lam0"]
    lines = [
        f"Random SmolLM2-135M-shaped Llama ({world['params'] / 1e6:.1f} M parameters, {world['layers']} layers, "
        "float32, default attention) loaded by `AsFTModule.configure_model()` from the sharded checkpoint; LoRA "
        f"r=8, alpha=32, dropout 0.05 on q_proj/v_proj ({res['lora_modules']} layers, {res['trainable']} trainable "
        f"parameters); direction file from section 3 (full V, float32) for the default `projector` anchor; for "
        "`anchor='inside'` a subspace file from the same pair (`extract_direction(aligned, base, "
        f"projector='subspace', rank={res['inside_k']}, reference='base')`, k = "
        f"{'/'.join(str(k) for k in res['inside_ranks'])}, float32). Batch {res['batch']} x {res['seq']} random "
        "tokens, loss on the second half. One step = `zero_grad` + `module._step(batch, with_grad=True)` + "
        f"`loss.backward()` + `AdamW.step()`, no Trainer, module in train mode. The {len(res['times'])} modules are "
        f"stepped in rotating interleaved order, {len(res['times']['lam1'])} steps each after warm-up.",
        "",
        *table(
            ["variant", "median step", "fastest step", "ratio of medians", "median of paired ratios", "ratio of fastest"],
            [["no direction (`direction=None, lam=0`)", fmt_time(med["none"]), fmt_time(mn["none"]), 1, 1, 1],
             ["anchor, `lam=0` (penalty value and drift statistics, no gradient), vs no direction",
              fmt_time(med["lam0"]), fmt_time(mn["lam0"]), f"{r0n:.4f}", f"{res['paired_lam0_none']:.4f}",
              f"{mn['lam0'] / mn['none']:.4f}"],
             ["**anchor, `lam=1`, vs `lam=0`**", fmt_time(med["lam1"]), fmt_time(mn["lam1"]), f"**{r10:.4f}**",
              f"{res['paired_lam1_lam0']:.4f}", f"{mn['lam1'] / mn['lam0']:.4f}"],
             ["anchor, `lam=1`, vs no direction", "", "", f"{med['lam1'] / med['none']:.4f}",
              f"{res['paired_lam1_none']:.4f}", f"{mn['lam1'] / mn['none']:.4f}"],
             [f"**anchor=inside (k={res['inside_k']}), `lam=1`, vs `lam=0`**", fmt_time(med["inside"]),
              fmt_time(mn["inside"]), f"**{ri0:.4f}**", f"{res['paired_inside_lam0']:.4f}",
              f"{mn['inside'] / mn['lam0']:.4f}"],
             ["anchor=inside, `lam=1`, vs no direction (plain LoRA)", "", "", f"{rin:.4f}",
              f"{res['paired_inside_none']:.4f}", f"{mn['inside'] / mn['none']:.4f}"]],
        ),
        "",
        "The anchor's own work, timed alone (all its per-layer computations for one step, outside the model, "
        f"median of 9): with gradients (lam > 0) {fmt_time(iso['with_grad'])} = "
        f"{100 * iso['with_grad'] / med['lam0']:.2f}% of the median lam=0 step; anchor=inside with gradients "
        f"{fmt_time(iso['inside_with_grad'])} = {100 * iso['inside_with_grad'] / med['lam0']:.2f}%; value and drift "
        "only (lam = 0) "
        f"{fmt_time(iso['value_only'])} = {100 * iso['value_only'] / med['none']:.2f}% of the median no-direction step.",
        "",
        "CPU time of the process per step (`time.process_time()`; with one intra-op thread this is the work done, "
        "and is far less affected by other processes than wall-clock time): median no direction "
        f"{fmt_time(cm['none'])}, lam=0 {fmt_time(cm['lam0'])}, lam=1 {fmt_time(cm['lam1'])}, anchor=inside lam=1 "
        f"{fmt_time(cm['inside'])}; **lam=1 / lam=0 = {cm['lam1'] / cm['lam0']:.4f}**, **inside / lam=0 = "
        f"{ci0:.4f}**, inside / no direction = {cm['inside'] / cm['none']:.4f}, lam=0 / no direction = "
        f"{cm['lam0'] / cm['none']:.4f}.",
        "",
        "Per-step wall-clock samples (s): "
        + "; ".join(f"{k}: " + ", ".join(f"{t:.3f}" for t in v) for k, v in res["times"].items()),
        "",
        f"Penalty after the timed steps (lam=1 module): {res['final_penalty']:.4g}, drift ratio "
        f"{res['final_drift']:.4f} (non-zero: the factors moved, so the penalty path did real work); anchor=inside "
        f"module: penalty {res['final_penalty_inside']:.4g}.",
    ]
    return lines, [
        (
            "AsFTModule step time lam=1 / lam=0 (wall clock, ratio of medians)",
            "<= 1.05",
            f"{r10:.4f}",
            r10 <= 1.05,
        ),
        (
            "AsFTModule step CPU time lam=1 / lam=0 (ratio of medians)",
            "<= 1.05",
            f"{cm['lam1'] / cm['lam0']:.4f}",
            cm["lam1"] / cm["lam0"] <= 1.05,
        ),
        (
            f"AsFTModule step time anchor=inside (k={res['inside_k']}) lam=1 / lam=0 (wall clock, ratio of medians)",
            "<= 1.05",
            f"{ri0:.4f}",
            ri0 <= 1.05,
        ),
        (
            f"AsFTModule step CPU time anchor=inside (k={res['inside_k']}) lam=1 / lam=0 (ratio of medians)",
            "<= 1.05",
            f"{ci0:.4f}",
            ci0 <= 1.05,
        ),
        (
            f"AsFTModule step time anchor=inside (k={res['inside_k']}) lam=1 / no direction (plain LoRA)",
            "(reported; no target)",
            f"{rin:.4f}",
            True,
        ),
        (
            "AsFTModule step time lam=0 with anchor / no direction",
            "(reported; no target)",
            f"{r0n:.4f}",
            True,
        ),
    ]


# ============================================================================================ report
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smaller, faster run (no SVD, fewer repeats, smaller batch)"
    )
    p.add_argument("--out", help="also write the Markdown report to this file")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: on a shared 2-core machine, 2 threads make timings of small "
        "operations swing several-fold whenever another process runs)",
    )
    p.add_argument("--workdir", help="scratch directory (default: a temporary one, removed afterwards)")
    p.add_argument(
        "--profile", action="store_true", help="also profile one lam=1 (projector, inside) and one lam=0 step"
    )
    p.add_argument("--skip", default="", help="comma list of sections to skip: penalty,step")
    p.add_argument(
        "--inside_k",
        type=int,
        default=INSIDE_RANK,
        help=f"k of the inside_energy basis (anchors inside / harm_subspace), both sections, 1 to {ALIGN_RANK} "
        f"(default {INSIDE_RANK}; the harm_subspace anchor's files use 8)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=7, help=argparse.SUPPRESS)
    p.add_argument("--aligned", help=argparse.SUPPRESS)
    p.add_argument("--unaligned", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if not 1 <= opts.inside_k <= ALIGN_RANK:
        # section 2's aligned checkpoint is a rank-ALIGN_RANK perturbation: a larger basis would be capped silently
        p.error(f"--inside_k must be in [1, {ALIGN_RANK}] (the synthetic alignment's rank), got {opts.inside_k}")

    import torch

    torch.set_num_threads(opts.threads)
    if opts.worker:
        fn = {"penalty": worker_penalty, "baseline": worker_baseline, "extract": worker_extract}[opts.worker]
        print(json.dumps(fn(opts)))
        return 0

    # Sizes of the run.
    opts.dim, opts.rank_k = 4096, 256
    opts.dense_reps = 2 if opts.quick else 5
    opts.reps = 3 if opts.quick else 7
    opts.layers = None
    opts.shard_size = "100MB"
    opts.batch, opts.seq = (2, 64) if opts.quick else (4, 128)
    opts.step_warmup = 1
    opts.step_reps = 4 if opts.quick else 8
    skip = set(filter(None, opts.skip.split(",")))

    started = time.perf_counter()
    monitor = OtherLoad()
    monitor.start()
    load_start = load_average()
    busy_start = busy_processes()
    command = command_line(__file__)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="asft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    targets: list[tuple[str, str, str, bool]] = []
    try:
        if "penalty" not in skip:
            log("1. penalty micro-benchmark")
            pen = penalty_section(opts, work, log)
            lines, t = penalty_report(pen)
            sections += ["## 1. Penalty forms at Llama-2-7B module shape", "", *lines, ""]
            targets += t
        if "step" not in skip:
            log("3. checkpoints + direction extraction")
            world = build_checkpoints(work, opts, log)
            ext = extraction_section(world, work, opts, log)
            inside = inside_direction(world, work, opts.inside_k, log)
            log("2. step-time overhead")
            step = step_section(world, ext["direction_file"], inside["file"], opts, log)
            step["inside_ranks"], step["inside_k"] = inside["kept_ranks"], opts.inside_k
            lines, t = step_report(step, world)
            sections += ["## 2. Training-step overhead of AsFTModule", "", *lines, ""]
            targets += t
            if "profile" in step:
                for key, table in step["profile"].items():
                    sections += [f"Profile of one {key} step (self CPU time):", "", "```", table, "```", ""]
            step.pop("modules")
            lines, t = extraction_report(world, ext)
            sections += [
                "## 3. Peak memory of direction extraction (multi-shard checkpoints)",
                "",
                *lines,
                "",
            ]
            targets += t
    finally:
        if not opts.workdir:
            shutil.rmtree(work, ignore_errors=True)

    import peft
    import transformers

    elapsed = time.perf_counter() - started
    load_end = load_average()
    monitor.stop_event.set()
    head = [
        "# AsFT regulariser benchmark",
        "",
        f"- Command: `{command}` (from the repository root)",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time {elapsed / 60:.1f} min"
        + (" (--quick)" if opts.quick else ""),
        f"- Machine: {machine()}",
        f"- torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, set with "
        f"`torch.set_num_threads({opts.threads})`; subprocesses the same), transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
        f"- Code: git {git_state()}",
        f"- Load average (1/5/15 min) at start {load_start}, at end {load_end}; other processes "
        f"using >= 5% CPU at start: {'; '.join(busy_start) if busy_start else 'none'}",
        f"- CPU used by processes other than this benchmark during the run (sampled from /proc): "
        f"{monitor.summary()}",
        "",
        "## Targets",
        "",
        *targets_table(targets),
        "",
    ]
    write_report("\n".join(head + sections).rstrip() + "\n", opts.out)
    if opts.out:
        log(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
