"""What `asft restore` costs on the offline world, per solver, against a forward+backward of the same data (issue 14).

    python benchmarks/restore_cost.py --seed 42 --variants fisher,first_order,cg --threads 2

Steps:
1. the fine-tune to restore: the safety benchmark's SFT adapter of ``--seed`` (trained and cached by
   ``benchmarks/safety_bench.py`` when missing), and the restoration data of its default rows (the world's
   restoration pairs, the task's training split, ``--restore_harmful`` / ``--restore_retain`` pairs);
2. the baseline, measured in the same process on the same batches: one forward+backward of the LoRA parameters
   over the harmful and the retain batches (what one first-order step needs at least);
3. each variant run through ``restore_adapter`` (the code path of ``asft restore``, loading included), its wall
   time, steps and stop reason, and its time as a multiple of the baseline. ``cg`` (10 task HVPs a step) runs
   ``--cg_steps`` steps only and reports its time per step.

Writes ``benchmarks/results/restore_cost.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import safety_bench  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fisher": {"method": "curvature", "solver": "fisher"},
    "first_order": {"method": "first_order", "solver": "fisher"},
    "lbfgs": {"method": "curvature", "solver": "lbfgs"},
    "cg": {"method": "curvature", "solver": "cg"},
    "first_order_hvp_metric": {"method": "first_order", "solver": "cg"},
}


def baseline_seconds(bench: safety_bench.Bench, adapter: Path, reps: int, hvp: bool = False) -> dict[str, Any]:
    """One forward+backward (LoRA gradients) over the restoration batches, one pass of per-example gradients of the
    retain batches, and with ``hvp`` one Hessian-vector product of the retain loss (double backward, eager
    attention: what ``cg`` takes about ``cg_max_iter + 1`` of per step, ``lbfgs`` 2)."""
    from asft_lightning.data import load_samples, sample_batches
    from asft_lightning.restoration import _functional, _mean_value_and_grad, per_example_gradients
    from asft_lightning.restore_command import _load_fine_tune

    a = bench.args
    model, tok = _load_fine_tune(bench.paths["aligned"], str(adapter), None, torch.float32, {})
    model.eval()
    harmful = load_samples(bench.paths["harmful_restore"], "harmful_data", "prompt", "response", limit=a.restore_harmful)
    retain = load_samples(bench.paths["task_train"], "retain_data", "instruction", "output", "input",
                          limit=a.restore_retain)
    retain_batches = sample_batches(tok, retain, a.batch_size, a.max_length)
    batches = sample_batches(tok, harmful, a.batch_size, a.max_length) + retain_batches
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    fns = [_functional(model, [b]) for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _mean_value_and_grad(fns, params)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    per_example_gradients(model, retain_batches, params)
    per_example = time.perf_counter() - t0
    hvp_s = None
    if hvp:
        from asft_lightning import curvature as cv
        from asft_lightning.restoration import _mean_hvp

        v = {k: torch.randn_like(p) for k, p in params.items()}
        with cv.second_order_attention(model):
            t0 = time.perf_counter()
            _mean_hvp([_functional(model, [b]) for b in retain_batches], params, v, "double_backward")
            hvp_s = time.perf_counter() - t0
    return {"fwd_bwd_s": min(times), "fwd_bwd_all_s": times, "tokens": tokens, "padded_tokens": padded,
            "harmful_pairs": len(harmful), "retain_pairs": len(retain), "per_example_grads_s": per_example,
            "retain_hvp_s": hvp_s}


def run_variant(bench: safety_bench.Bench, adapter: Path, name: str, cg_steps: int) -> dict[str, Any]:
    """``restore_adapter`` with the benchmark's default-row settings and this variant's method and solver."""
    from asft_lightning.restore_command import restore_adapter

    a = bench.args
    steps = cg_steps if VARIANTS[name]["solver"] in ("cg",) else a.restore_steps
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = restore_adapter(
            model=bench.paths["aligned"], adapter=str(adapter), harmful_data=bench.paths["harmful_restore"],
            retain_data=bench.paths["task_train"], output=str(Path(tmp) / "restored"), num_harmful=a.restore_harmful,
            num_retain=a.restore_retain, batch_size=a.batch_size, max_length=a.max_length, max_steps=steps,
            trust_region=a.trust_region, task_loss_budget=a.task_loss_budget, cg_max_iter=a.cg_max_iter,
            target_margin=a.target_margin, fisher_damping=a.fisher_damping, progress=False, **VARIANTS[name],
        )  # fmt: skip
        wall = time.perf_counter() - t0
    res = report["result"]
    step_s = [r["seconds"] for r in res["records"]]
    return {"variant": name, **VARIANTS[name], "wall_s": wall, "restore_s": res["seconds"], "steps": len(step_s),
            "step_s": step_s, "stop_reason": res["stop_reason"], "restored": res["restored"],
            "harmful_loss": [res["initial_harmful_loss"], res["final_harmful_loss"]],
            "reference_harmful_loss": res["reference_harmful_loss"],
            "task_loss": [res["initial_task_loss"], res["final_task_loss"]], "max_steps": steps}


def render(report: dict[str, Any]) -> str:
    base = report["baseline"]
    lines = [
        "# What `asft restore` costs on the offline world (issue 14, item 4)",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}, {report['threads']} torch threads",
        f"- command: `{report['command']}`",
        f"- load average before: {report['load_before']}",
        f"- fine-tune: the safety benchmark's SFT adapter, seed {report['seed']}; data: {base['harmful_pairs']} "
        f"restoration pairs + {base['retain_pairs']} task pairs, batch {report['batch_size']}, at most "
        f"{report['max_length']} tokens ({base['tokens']} tokens, {base['padded_tokens']} with padding)",
        f"- baseline: one forward+backward of the LoRA parameters over those batches: **{base['fwd_bwd_s']:.1f} s** "
        f"(best of {len(base['fwd_bwd_all_s'])}); one gradient per retain example (the Fisher's rows): "
        f"{base['per_example_grads_s']:.1f} s"
        + (f"; one Hessian-vector product of the retain loss (double backward, eager attention): "
           f"{base['retain_hvp_s']:.1f} s (a `cg` step takes up to cg_max_iter + 1 of them, an `lbfgs` step 2)"
           if base.get("retain_hvp_s") is not None else ""),
        "",
        "| variant | method | solver | wall s (asft restore, loading included) | / fwd+bwd | steps | s per step | "
        "stop | L_h start -> end (reference) | L_t start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        per_step = sum(v["step_s"]) / max(1, len(v["step_s"]))
        lines.append(
            f"| {v['variant']} | {v['method']} | {v['solver']} | {v['wall_s']:.0f} | "
            f"{v['wall_s'] / base['fwd_bwd_s']:.1f}x | {v['steps']} (max {v['max_steps']}) | {per_step:.0f} | "
            f"{v['stop_reason']} | {v['harmful_loss'][0]:.3f} -> {v['harmful_loss'][1]:.3f} "
            f"({v['reference_harmful_loss']:.3f}) | {v['task_loss'][0]:.3f} -> {v['task_loss'][1]:.3f} |"
        )
    lines += ["", f"Target (issue 14): <= 300 s on 2 cores at the chosen settings. {report['verdict']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--variants", default="fisher,first_order,cg", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--cg_steps", type=int, default=1, help="steps of the cg variants (each ~10 task HVPs)")
    p.add_argument("--baseline_reps", type=int, default=2)
    p.add_argument("--hvp", action="store_true", help="also time one HVP of the retain loss")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "restore_cost.md")
    args, rest = p.parse_known_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    bench_args = safety_bench.parse_args(["--seeds", str(args.seed), "--threads", str(args.threads), *rest])
    bench = safety_bench.Bench(bench_args)
    load_before = benchlib.load_average()
    adapter, _ = bench.sft(args.seed)  # 1. the fine-tune (cached by the safety benchmark)
    baseline = baseline_seconds(bench, adapter, args.baseline_reps, args.hvp)  # 2. the baseline
    results = [run_variant(bench, adapter, v, args.cg_steps) for v in variants]  # 3. the variants
    best = min((r for r in results if r["restored"]), key=lambda r: r["wall_s"], default=None)
    verdict = (f"Fastest restoring variant: {best['variant']}, {best['wall_s']:.0f} s: "
               + ("met." if best["wall_s"] <= 300 else "missed.")) if best else "No variant restored: missed."
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": benchlib.machine(),
              "threads": args.threads, "command": benchlib.command_line("benchmarks/restore_cost.py"),
              "load_before": load_before, "seed": args.seed, "batch_size": bench_args.batch_size,
              "max_length": bench_args.max_length, "baseline": baseline, "variants": results, "verdict": verdict}
    text = render(report)
    benchlib.write_report(text, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
