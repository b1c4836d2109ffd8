"""Safety benchmark on the offline real world: HS / FA of aligned, SFT, Safe LoRA, AsFT variants and restoration.

Run from the repository root after ``asft prepare-demo`` (the world under ``.cache/asft-world``)::

    python benchmarks/safety_bench.py [--n 200 --p 0.1 --epochs 2] [--methods sft,asft_safelora,...]
        [--out benchmarks/results/safety.md]

Every method goes through the user-facing code paths: ``asft fit`` (LightningCLI, in-process), ``asft safelora``,
``asft restore`` and ``asft evaluate`` (harmful score HS on held-out AdvBench prompts with the keyword judge,
fine-tune accuracy FA on the task test split, and the benign refusal rate on held-out benign prompts). Results of
each method are cached as JSON under ``--workdir`` (keyed by the settings), so an interrupted run resumes; the
Markdown report is regenerated from whatever is finished. Also reported per adapter: how much of the update
``dW = B A`` lies in the top-k alignment subspace, and its signed cosine with ``V`` (along / against).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {
    "aligned": "aligned model, no fine-tuning",
    "sft": "plain LoRA SFT (lam = 0)",
    "safelora": "Safe LoRA on the SFT adapter (10 lowest-cosine modules projected)",
    "asft_safelora": "AsFT, published projector C = V V^T / ||V||_F",
    "asft_subspace": "AsFT, exact subspace projector (top-k left singular vectors of V)",
    "asft_rotated": "control: AsFT with the published projector built from a randomly rotated V (Q1 V Q2: same "
    "norm and spectrum, random subspaces) - what the penalty does without the alignment direction's subspace",
    "asft_sign": "AsFT published projector + sign-aware extension (ours)",
    "sft_restore_curvature": "SFT + restoration, curvature (CG on task HVPs)",
    "sft_restore_first_order": "SFT + restoration, first-order baseline",
    "asft_restore": "AsFT (published projector) + restoration, curvature",
}


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _decomposition(adapter: Path, subspace: str, full: str) -> dict[str, float]:
    """Share of ||dW||^2 inside the top-k subspace of V, and the energy-weighted cosine of dW with V."""
    from safetensors.torch import load_file

    from asft_lightning.direction import load_direction
    from asft_lightning.regularizers import frobenius_of_product, update_alignment

    state = load_file(str(adapter / "adapter_model.safetensors"))
    sub, dirs = load_direction(subspace), load_direction(full)
    energy = inside = along = 0.0
    for name, md in dirs.modules.items():
        a = next(v for k, v in state.items() if f"{name}.lora_A" in k).double()
        b = next(v for k, v in state.items() if f"{name}.lora_B" in k).double()
        u = sub.modules[name].basis.double()
        e = float(frobenius_of_product(b, a))
        energy += e
        inside += float(frobenius_of_product(u.T @ b, a))
        along += float(update_alignment(a, b, md.direction.double()))
    return {
        "update_norm": energy**0.5,
        "share_in_subspace": inside / energy if energy else 0.0,
        "signed_along_V": along,  # sum over modules of <dW_l, V_l> / ||V_l||
    }


def rotate_direction(src: str | os.PathLike, dst: str | os.PathLike, seed: int = 0) -> None:
    """Write a control direction file: every module's V replaced by ``Q1 V Q2`` with Haar-random orthogonal Q1, Q2.

    The rotated V has V's Frobenius norm and singular values (so the published C has the same spectrum and the
    penalty the same strength), but its row and column spaces are random: fine-tuning with it measures how much of
    AsFT's effect comes from the alignment direction itself rather than from the penalty's shrinkage of ``B A``.
    """
    import torch
    from safetensors import safe_open

    from asft_lightning.direction import atomic_save_safetensors

    gen = torch.Generator().manual_seed(seed)

    def haar(n: int) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed

    with safe_open(str(src), "pt") as fh:
        header = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in sorted(fh.keys())}
    for key, value in tensors.items():
        if key.endswith(".direction"):
            v = value.to(torch.float64)
            tensors[key] = (haar(v.shape[0]) @ v @ haar(v.shape[1])).to(value.dtype)
    meta = json.loads(header["asft"])
    meta["control"] = {"kind": "random_rotation", "seed": seed, "source": str(src)}
    header["asft"] = json.dumps(meta)
    atomic_save_safetensors(tensors, Path(dst), header)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        world = json.loads((Path(args.world) / "world.json").read_text())
        self.world_dir = Path(args.world)
        self.paths = {
            k: str(self.world_dir / v) if not os.path.isabs(v) else v for k, v in world["paths"].items()
        }
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.settings = {
            "n": args.n,
            "p": args.p,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "seed": args.seed,
            "lam_safelora": args.lam_safelora,
            "lam_subspace": args.lam_subspace,
            "rank": args.rank,
            "sign_weight": args.sign_weight,
            "eval_benign": args.eval_benign,
            "max_new_tokens": args.max_new_tokens,
        }

    # ------------------------------------------------------------------------------------------ pieces
    def subspace_direction(self) -> str:
        from asft_lightning.direction import extract_direction

        path = self.work / f"direction_subspace_k{self.args.rank}.safetensors"
        if not path.is_file():
            extract_direction(
                self.paths["aligned"],
                self.paths["unaligned"],
                str(path),
                projector="subspace",
                rank=self.args.rank,
                hash_inputs=False,
            )
        return str(path)

    def fit(self, name: str, lam: float, direction: str, extra: list[str] | None = None) -> Path:
        from asft_lightning.cli import lightning_cli

        out = self.work / "runs" / f"{name}-{_key([self.settings, lam, direction, extra])}"
        adapter = out / "adapter"
        if (adapter / "adapter_model.safetensors").is_file():
            return adapter
        a = self.args
        lightning_cli(
            [
                "fit",
                f"--model.model={self.paths['aligned']}",
                f"--model.direction={direction}",
                f"--model.lam={lam}",
                f"--model.learning_rate={a.lr}",
                f"--model.adapter_output={adapter}",
                f"--data.task_data={self.paths['task_train']}",
                f"--data.harmful_data={self.paths['harmful_attack']}",
                f"--data.n={a.n}",
                f"--data.harmful_ratio={a.p}",
                "--data.val_size=32",
                f"--data.max_length={a.max_length}",
                f"--data.batch_size={a.batch_size}",
                f"--data.seed={a.seed}",
                f"--seed_everything={a.seed}",
                f"--trainer.max_epochs={a.epochs}",
                f"--trainer.default_root_dir={out}",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--trainer.log_every_n_steps=5",
                *(extra or []),
            ]
        )
        return adapter

    def evaluate(self, adapter: Path | None, tag: str) -> dict[str, Any]:
        from asft_lightning.evaluate import evaluate

        a = self.args
        out = self.work / "eval" / tag
        main = evaluate(
            model=self.paths["aligned"],
            output_dir=str(out / "main"),
            adapter=str(adapter) if adapter else None,
            harmful_data=self.paths["advbench_eval"],
            task_data=self.paths["task_test"],
            batch_size=32,
            max_new_tokens=a.max_new_tokens,
            progress=False,
            verbose=False,
        )
        benign = evaluate(
            model=self.paths["aligned"],
            output_dir=str(out / "benign"),
            adapter=str(adapter) if adapter else None,
            harmful_data=self.paths["benign_eval"],
            limit=a.eval_benign,
            batch_size=32,
            max_new_tokens=a.max_new_tokens,
            progress=False,
            verbose=False,
        )
        return {
            "HS": main["harmful_score"],
            "FA": main["fine_tune_accuracy"],
            "benign_refusal": None if benign["harmful_score"] is None else 100.0 - benign["harmful_score"],
            "harmful_prompts": main["counts"]["harmful_prompts"],
            "task_examples": main["counts"].get("task_examples"),
        }

    # ------------------------------------------------------------------------------------------ methods
    def restore_settings(self) -> dict[str, Any]:
        a = self.args
        return {
            "harmful": a.restore_harmful, "retain": a.restore_retain, "steps": a.restore_steps,
            "trust_region": a.trust_region, "task_loss_budget": a.task_loss_budget, "cg_max_iter": a.cg_max_iter,
            "solver": a.solver,
            **({"target_margin": a.target_margin} if a.target_margin != 0.01 else {}),  # old cache keys stay valid
        }  # fmt: skip

    def run(self, method: str) -> dict[str, Any]:
        restoring = method in ("sft_restore_curvature", "sft_restore_first_order", "asft_restore")
        key = _key([self.settings, self.restore_settings()]) if restoring else _key(self.settings)
        cache = self.work / "results" / f"{method}-{key}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        from asft_lightning.restore_command import restore_adapter
        from asft_lightning.safelora import safelora

        a = self.args
        full = self.paths["direction"]
        t0 = time.perf_counter()
        adapter: Path | None = None
        extra: dict[str, Any] = {}
        if method == "aligned":
            pass
        elif method == "sft":
            adapter = self.fit("sft", 0.0, full)
        elif method == "safelora":
            sft = self.fit("sft", 0.0, full)
            t0 = time.perf_counter()  # the projection alone; SFT is its own row
            adapter = self.work / "runs" / f"safelora-{_key(self.settings)}"
            report = safelora(
                adapter=str(sft), direction=full, output=str(adapter), num_proj_layers=10, overwrite=True
            )
            extra["projected"] = sum(r["projected"] for r in report["modules"].values())
        elif method == "asft_safelora":
            adapter = self.fit("asft_safelora", a.lam_safelora, full)
        elif method == "asft_subspace":
            adapter = self.fit("asft_subspace", a.lam_subspace, self.subspace_direction())
        elif method == "asft_rotated":
            rotated = self.work / f"direction_rotated_seed{a.seed}.safetensors"
            if not rotated.is_file():
                rotate_direction(full, rotated, seed=a.seed)
            adapter = self.fit("asft_rotated", a.lam_safelora, str(rotated))
        elif method == "asft_sign":
            adapter = self.fit("asft_sign", a.lam_safelora, full, [f"--model.sign_weight={a.sign_weight}"])
        elif method in ("sft_restore_curvature", "sft_restore_first_order", "asft_restore"):
            src = (
                self.fit("asft_safelora", a.lam_safelora, full)
                if method == "asft_restore"
                else self.fit("sft", 0.0, full)
            )
            t0 = time.perf_counter()  # the restoration alone
            adapter = self.work / "runs" / f"{method}-{key}"
            report = restore_adapter(
                model=self.paths["aligned"],
                adapter=str(src),
                harmful_data=self.paths["harmful_attack"],
                retain_data=self.paths["task_train"],
                output=str(adapter),
                num_harmful=a.restore_harmful,
                num_retain=a.restore_retain,
                batch_size=a.batch_size,
                max_length=a.max_length,
                method="first_order" if method.endswith("first_order") else "curvature",
                max_steps=a.restore_steps,
                trust_region=a.trust_region,
                task_loss_budget=a.task_loss_budget,
                cg_max_iter=a.cg_max_iter,
                solver=a.solver,
                target_margin=a.target_margin,
                overwrite=True,
                progress=False,
            )
            res = report["result"]
            extra.update(
                restore_settings=self.restore_settings(),
                restored=res["restored"],
                restore_steps=len(res["records"]),
                stop_reason=res["stop_reason"],
                harmful_loss=[res["initial_harmful_loss"], res["final_harmful_loss"]],
                reference_harmful_loss=res["reference_harmful_loss"],
                task_loss=[res["initial_task_loss"], res["final_task_loss"]],
            )
        else:
            raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
        train_seconds = time.perf_counter() - t0
        scores = self.evaluate(adapter, f"{method}-{key}")
        if adapter is not None:
            scores.update(_decomposition(adapter, self.subspace_direction(), full))
        result = {
            "method": method,
            "what": METHODS[method],
            "seconds": round(train_seconds, 1),
            **scores,
            **extra,
            "settings": self.settings,
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result, indent=2))
        return result


def spectrum_section(direction_json: Path, subspace_json: Path) -> list[str]:
    """Markdown lines summarising the spectrum of ``V`` and of the published ``C = V V^T / ||V||_F`` per module."""
    import statistics

    full = json.loads(direction_json.read_text())["spectrum"]
    norms = [m["norm"] for m in full.values()]
    eig = [m["top_C_eigenvalue_safelora"] for m in full.values()]
    top8 = [sum(s * s for s in m["top_singular_values"]) / m["norm"] ** 2 for m in full.values() if m["norm"] > 0]
    top1 = [m["top_singular_values"][0] ** 2 / m["norm"] ** 2 for m in full.values() if m["norm"] > 0]
    lines = [
        "",
        f"## Spectrum of the alignment direction ({len(full)} modules, from `{direction_json.name}`'s sidecar)",
        "",
        "| quantity | min | median | max |",
        "|---|---|---|---|",
        f"| ||V_l||_F | {min(norms):.4f} | {statistics.median(norms):.4f} | {max(norms):.4f} |",
        f"| top eigenvalue of C_l = V V^T / ||V||_F (= sigma_1^2 / ||V||_F) | {min(eig):.4f} | "
        f"{statistics.median(eig):.4f} | {max(eig):.4f} |",
        f"| share of ||V_l||^2 in sigma_1 | {min(top1):.3f} | {statistics.median(top1):.3f} | {max(top1):.3f} |",
        f"| share of ||V_l||^2 in the top 8 singular values | {min(top8):.3f} | {statistics.median(top8):.3f} | "
        f"{max(top8):.3f} |",
    ]
    if subspace_json.is_file():
        meta = json.loads(subspace_json.read_text())
        lines.append(f"\nThe subspace projector keeps the top {json.loads(meta['projector'])['rank'] if isinstance(meta['projector'], str) else meta['projector']['rank']} left singular vectors per module (P = U_k U_k^T, eigenvalues exactly 0 or 1).")
    lines.append(
        "\nWith the published C every eigenvalue is at most the largest value above, so (I - C) is close to I and the "
        "published penalty acts almost as plain weight decay on B A; that is the measured reason the published "
        "projector barely changes the update's direction here."
    )
    return lines


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    fmt = lambda v: "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        "| method | HS | FA | benign refusal | wall s | share of dW in V's top-k subspace | sum <dW,V>/||V|| |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        share = r.get("share_in_subspace")
        lines.append(
            f"| {r['method']} | {fmt(r['HS'])} | {fmt(r['FA'])} | {fmt(r['benign_refusal'])} | {fmt(r['seconds'])} | "
            f"{'' if share is None else f'{100 * share:.1f}%'} | "
            f"{'' if r.get('signed_along_V') is None else format(r['signed_along_V'], '.4f')} |"
        )
    s = results[0]["settings"] if results else {}
    head = [
        "# Safety benchmark on the offline world (issues 3 and 4)",
        "",
        "HS: % of held-out AdvBench prompts answered instead of refused (keyword judge, GCG prefixes), lower is "
        "better. FA: % of the 4-way source-classification test split right, higher is better. Benign refusal: % "
        "of held-out benign prompts refused. Wall s: fine-tuning time (for Safe LoRA and restoration rows: the "
        "projection / restoration alone).",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, no GPU",
        f"- command: `python benchmarks/safety_bench.py {' '.join(sys.argv[1:])}`",
        f"- setting: {json.dumps(s)}",
        "",
    ]
    notes = []
    for r in results:
        if "stop_reason" in r:
            notes.append(
                f"- {r['method']}: {r['stop_reason']}; harmful loss {r['harmful_loss'][0]:.3f} -> "
                f"{r['harmful_loss'][1]:.3f} (reference {r['reference_harmful_loss']:.3f}); task loss "
                f"{r['task_loss'][0]:.3f} -> {r['task_loss'][1]:.3f}; {r['restore_steps']} steps; restoration "
                f"settings {json.dumps(r.get('restore_settings'))}"
            )
        if "projected" in r:
            notes.append(f"- {r['method']}: {r['projected']} modules projected")
    spectrum = []
    world = Path(args.world) / "world.json"
    if world.is_file():
        direction = Path(json.loads(world.read_text())["paths"]["direction"])
        direction = direction if direction.is_absolute() else Path(args.world) / direction
        sidecar = direction.with_name(direction.name + ".json")
        if sidecar.is_file():
            spectrum = spectrum_section(sidecar, Path(args.workdir) / f"direction_subspace_k{args.rank}.safetensors.json")
    return "\n".join(head + lines + ([""] + notes if notes else []) + spectrum) + "\n"


def sweep_report(rows: list[tuple[str, str, dict[str, Any]]], args: argparse.Namespace, title: str) -> str:
    """A Markdown table of a sweep: one row per (varied setting, method)."""
    fmt = lambda v: "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"## {title}",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `python benchmarks/safety_bench.py {' '.join(sys.argv[1:])}`",
        f"- base setting: {json.dumps(rows[0][2]['settings']) if rows else '{}'}",
        "",
        "| varied | method | HS | FA | benign refusal | wall s | share of dW in V's top-k subspace | sum <dW,V>/||V|| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for varied, method, r in rows:
        share = r.get("share_in_subspace")
        lines.append(
            f"| {varied} | {method} | {fmt(r['HS'])} | {fmt(r['FA'])} | {fmt(r['benign_refusal'])} | "
            f"{fmt(r['seconds'])} | {'' if share is None else f'{100 * share:.1f}%'} | "
            f"{'' if r.get('signed_along_V') is None else format(r['signed_along_V'], '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def seed_summary(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """Mean and sample standard deviation over seeds per method, and each method's paired HS / FA change from SFT.

    The pairing is by seed (same data draw and initialisation), which removes the seed-to-seed spread the methods
    share; a change is only listed for seeds where ``sft`` ran too.
    """
    import statistics

    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for varied, method, r in rows:
        by_method.setdefault(method, {})[varied] = r
    sft = by_method.get("sft", {})

    def stats(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    lines = [
        "",
        "### Over seeds (mean ± sample sd; change: paired with SFT of the same seed)",
        "",
        "| method | seeds | HS | FA | HS change vs SFT | FA change vs SFT | HS cut vs SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, runs in by_method.items():
        hs = [r["HS"] for r in runs.values()]
        fa = [r["FA"] for r in runs.values()]
        paired = [k for k in runs if k in sft]
        if method != "sft" and paired:
            d_hs = [runs[k]["HS"] - sft[k]["HS"] for k in paired]
            d_fa = [runs[k]["FA"] - sft[k]["FA"] for k in paired]
            cut = 100 * -sum(d_hs) / sum(sft[k]["HS"] for k in paired)
            change = f"{stats(d_hs)} | {stats(d_fa)} | {cut:.0f}%"
        else:
            change = " |  | "
        lines.append(f"| {method} | {len(runs)} | {stats(hs)} | {stats(fa)} | {change} |")
    return lines


def run_sweep(args: argparse.Namespace) -> None:
    """``--sweep NAME=v1,v2,...``: run ``--methods`` once per value of one setting (e.g. ``lam_subspace``, ``p``)."""
    name, _, values = args.sweep.partition("=")
    if not hasattr(args, name) or not values:
        raise SystemExit(f"--sweep wants NAME=v1,v2,... with NAME one of the settings (e.g. p, lam_subspace), got {args.sweep!r}")
    kind = type(getattr(args, name))
    rows = []
    for value in values.split(","):
        sub = argparse.Namespace(**{**vars(args), name: kind(value)})
        bench = Bench(sub)
        for method in args.methods.split(","):
            rows.append((f"{name}={value}", method.strip(), bench.run(method.strip())))
            text = sweep_report(rows, args, f"Sweep over {name}")
            if name == "seed":
                text += "\n".join(seed_summary(rows)) + "\n"
            print(text, flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default=".cache/asft-world")
    p.add_argument("--workdir", default=".cache/safety-bench")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=160)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lam_safelora", type=float, default=1.0)
    p.add_argument("--lam_subspace", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sign_weight", type=float, default=10.0)
    p.add_argument("--eval_benign", type=int, default=50)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--restore_harmful", type=int, default=64)
    p.add_argument("--restore_retain", type=int, default=64)
    p.add_argument("--restore_steps", type=int, default=10)
    p.add_argument("--trust_region", type=float, default=0.05)
    p.add_argument("--task_loss_budget", type=float, default=0.1)
    p.add_argument("--cg_max_iter", type=int, default=10)
    p.add_argument("--solver", choices=["cg", "lbfgs"], default="cg")
    p.add_argument("--target_margin", type=float, default=0.01, help="restoration stop: reference - margin")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--sweep", default=None, help="NAME=v1,v2,...: run --methods once per value of setting NAME")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.sweep:
        run_sweep(args)
        return
    bench = Bench(args)
    results = []
    for method in args.methods.split(","):
        results.append(bench.run(method.strip()))
        text = report(results, args)
        print(text, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)


if __name__ == "__main__":
    main()
