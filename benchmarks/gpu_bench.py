"""python benchmarks/gpu_bench.py --zero 0 2 3 --out benchmarks/results/gpu.md

GPU throughput of AsFT against plain LoRA and the published dense regulariser, on one GPU, in bf16.

Run from the repository root on a machine with one CUDA GPU (the command above). Never run on a GPU yet: the
estimate is 5 to 15 minutes for the three strategies, most of it loading the model once per run; under a time
cap per command, run ``--zero 0``, ``--zero 2`` and ``--zero 3`` separately, each with its own ``--out``.
Without a CUDA device and without ``--device cpu`` it prints ``no CUDA device: skipped`` and exits 0. CPU smoke
run (fp32, one torch thread, about 20 s)::

    python benchmarks/gpu_bench.py --device cpu --preset tiny --steps 2 --warmup 1

What it does, all in one process:

1. Builds a randomly initialised ``LlamaForCausalLM`` (``--preset 1b``: the TinyLlama-1.1B shape, hidden 2048,
   intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000; ``--preset tiny`` for CPU smoke runs) in
   ``--dtype`` (bf16 on CUDA) and saves it as the "unaligned" checkpoint; perturbs every targeted weight by a
   random rank-16 matrix (5% of the weight's norm) and saves that as the "aligned" checkpoint; extracts the
   direction file with the project's :func:`asft_lightning.direction.extract_direction`, with what ``asft
   direction`` produces by default: projector ``safelora`` (the published ``C = V V^T / ||V||_F``) stored as the
   full ``V``, float32 (input hashing and the spectrum summary are skipped: metadata only, same tensors).
2. Trains three variants through :class:`asft_lightning.module.AsFTModule` and a Lightning ``Trainer`` (one
   device, ``--precision``, the strategy under test), exactly the code ``asft fit`` runs, on the same random token
   batches (``--batch`` x ``--seq``, every token a label), PEFT LoRA rank ``--rank`` on ``--targets``, AdamW:

   * ``plain LoRA``: ``AsFTModule(direction=None, lam=0)``, no anchor;
   * ``AsFT``: ``AsFTModule(direction=<file>, lam=--lam)``: the penalty computed inside each LoRA layer's forward
     by :class:`~asft_lightning.anchor.LoraAnchor`, with ``V`` on the device;
   * ``published dense``: plain LoRA plus, in ``training_step``, ``lam * sum_l ||(I - C_l) B_l A_l||_F^2`` with
     ``P_l = I - C_l`` formed once per module as a ``d_out x d_out`` matrix on the device (at fit start, in the
     LoRA weights' dtype, as the anchor places ``V``) and the penalty computed densely, ``||P (B A)||_F^2``
     (``dense_residual_projector`` and ``dense_loss`` of ``regularizer_bench.py``), as the authors' code does.

   Each run does ``--warmup`` optimizer steps, then ``--steps`` timed ones (forward, backward, AdamW step, and the
   module's own per-step logging and finiteness check); ``torch.cuda.synchronize()`` brackets every step and the
   timed window is from the start of the first timed step to the end of the last. tokens/s = ``steps x batch x seq
   / window``. Each variant runs ``--repeats`` times, in rotated order; the table gives the median tokens/s and
   the ratio of medians. Peak memory is ``torch.cuda.max_memory_allocated()`` over the whole run (model load
   included), reset before each run; on CPU it is the process's peak resident-set increase over the run instead.

``--zero``: strategies to measure, each its own table: ``0`` Lightning's default single-device strategy; ``2`` /
``3`` Lightning's ``DeepSpeedStrategy(stage=N)`` on one GPU (``DeepSpeedCPUStrategy`` with ``--device cpu``).
Under ZeRO-3 the published dense form is not run: it reads the LoRA factors in ``training_step``, where ZeRO-3 has
them partitioned (that is why the project computes the penalty inside each layer's forward). ZeRO correctness on
one GPU (loss and LoRA update against an fp32 reference) is the GPU test
``tests/test_deepspeed.py::test_gpu_bf16_zero_matches_fp32_reference``; this script measures speed and memory.

A run that fails is reported in its table row (the error), the other runs go on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SKIP_LINE = "no CUDA device: skipped"
MiB = 1024 * 1024

LLAMA_COMMON = dict(rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2)
PRESETS: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json), randomly initialised here
    "1b": dict(
        config=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, **LLAMA_COMMON),
        batch=4, seq=1024, repeats=3,
    ),
    "tiny": dict(
        config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **LLAMA_COMMON),
        batch=2, seq=64, repeats=1,
    ),
}
VARIANTS = ("plain", "asft", "dense")
LABELS = {"plain": "plain LoRA", "asft": "AsFT (anchor)", "dense": "published dense"}
PERTURB_RANK = 16


# ------------------------------------------------------------------------------------------- the model world
def build_world(opts: argparse.Namespace, work: Path, log) -> dict[str, Any]:
    """Random base + perturbed "aligned" checkpoints and their direction file (``asft direction``'s default form)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from asft_lightning.direction import extract_direction, module_matches

    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    dtype = getattr(torch, opts.dtype)
    with torch.device(opts.device):  # random init on the GPU is much faster than on the CPU
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[opts.preset]["config"])).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    base, aligned, direction = work / "base", work / "aligned", work / "direction.safetensors"
    model.save_pretrained(base)
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name.endswith(".weight") and module_matches(name[:-7], opts.targets):
                left = torch.randn(p.shape[0], PERTURB_RANK, generator=gen, device=p.device, dtype=torch.float32)
                right = torch.randn(PERTURB_RANK, p.shape[1], generator=gen, device=p.device, dtype=torch.float32)
                delta = left @ right
                delta *= 0.05 * torch.linalg.vector_norm(p.float()) / torch.linalg.vector_norm(delta)
                p.add_(delta.to(p.dtype))
    model.save_pretrained(aligned)
    del model
    gc.collect()
    if opts.device == "cuda":
        torch.cuda.empty_cache()
    log(f"built and saved base + aligned checkpoints ({n_params / 1e6:.1f} M parameters) in "
        f"{time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    ds = extract_direction(str(aligned), str(base), str(direction), target_modules=opts.targets,
                           projector="safelora", dtype="float32", hash_inputs=False, spectrum_size=0)
    direction_bytes = sum(t.numel() * t.element_size() for md in ds.modules.values()
                          for t in (md.direction, md.basis, md.weights, md.norm) if t is not None)
    log(f"extracted the direction ({len(ds.modules)} modules) in {time.perf_counter() - t0:.1f} s")
    return {"base": str(base), "direction": str(direction), "params": n_params, "modules": len(ds.modules),
            "direction_bytes": direction_bytes, "projector": ds.metadata["projector"]}


def make_batches(opts: argparse.Namespace, vocab: int):
    """The same random-token batches for every run: a DataLoader over fixed examples, no shuffling."""
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(opts.seed + 2)
    n = (opts.warmup + opts.steps) * opts.batch
    ids = torch.randint(0, vocab, (n, opts.seq), generator=gen)
    mask = torch.ones(opts.seq, dtype=torch.long)
    examples = [{"input_ids": ids[i], "attention_mask": mask, "labels": ids[i]} for i in range(n)]
    return DataLoader(examples, batch_size=opts.batch, shuffle=False, num_workers=0)


# ------------------------------------------------------------------------------------------- the variants
def dense_module_class():
    """:class:`AsFTModule` with ``lam = 0`` plus the published dense penalty in ``training_step``."""
    import torch
    from regularizer_bench import dense_loss, dense_residual_projector

    from asft_lightning.anchor import lora_layers, lora_shapes
    from asft_lightning.direction import load_direction
    from asft_lightning.module import DTYPES, AsFTModule

    class DenseRegularizedModule(AsFTModule):
        """Plain LoRA (no anchor) whose loss adds ``dense_lam * sum_l ||P_l (B_l A_l)||_F^2``, ``P_l = I - C_l``.

        ``P_l`` is formed once, at fit start, on the LoRA weights' device, in ``direction_dtype`` or the LoRA
        weights' dtype (the rule the anchor uses for ``V``); the penalty reads the LoRA factors in
        ``training_step``, like the authors' code.
        """

        def __init__(self, dense_direction: str, dense_lam: float = 1.0, **kwargs: Any) -> None:
            super().__init__(direction=None, lam=0.0, **kwargs)
            self.dense_directions = load_direction(dense_direction)
            self.dense_lam = float(dense_lam)
            self._dense: list[tuple[Any, Any, Any]] = []

        def on_fit_start(self) -> None:
            layers = lora_layers(self.model)
            self.dense_directions.check_modules(lora_shapes(layers), self.model_path)
            self._dense = []
            for name, layer in layers.items():
                adapter = layer.active_adapters[0]
                lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                dtype = DTYPES[self.hparams.direction_dtype] if self.hparams.direction_dtype else lora_b.dtype
                md = self.dense_directions.modules[name]
                if md.direction is None:
                    raise ValueError(f"{name}: the published dense form needs the full V in the direction file")
                with torch.no_grad():
                    p = dense_residual_projector(md.direction.to(lora_b.device, torch.float32)).to(dtype)
                self._dense.append((lora_a, lora_b, p))

        def _step(self, batch, with_grad: bool):
            out = super()._step(batch, with_grad)
            if with_grad and self._dense:
                penalty = torch.stack([dense_loss(a, b, p.to(b.dtype)) for a, b, p in self._dense]).sum()
                out["penalty"] = penalty.detach()
                out["loss"] = out["loss"] + self.dense_lam * penalty.to(out["loss"].dtype)
            return out

    return DenseRegularizedModule


def make_module(variant: str, opts: argparse.Namespace, world: dict[str, Any], adapter_out: Path):
    from asft_lightning.module import AsFTModule

    common = dict(
        model=world["base"], lora_r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
        target_modules=list(opts.targets), learning_rate=opts.lr, dtype=opts.dtype,
        direction_dtype=opts.direction_dtype, attn_implementation=opts.attn_implementation,
        gradient_checkpointing=opts.gradient_checkpointing, adapter_output=str(adapter_out),
    )
    if variant == "plain":
        return AsFTModule(direction=None, lam=0.0, **common)
    if variant == "asft":
        return AsFTModule(direction=world["direction"], lam=opts.lam, **common)
    if variant == "dense":
        return dense_module_class()(dense_direction=world["direction"], dense_lam=opts.lam, **common)
    raise ValueError(variant)


def make_strategy(zero: int, device: str):
    if zero == 0:
        return "auto"
    if device == "cpu":
        from asft_lightning.strategies import DeepSpeedCPUStrategy

        return DeepSpeedCPUStrategy(stage=zero)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=zero)


def step_timer(warmup: int, cuda: bool):
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Wall-clock start and end of every training batch (optimizer step included), CUDA-synchronised."""

        def __init__(self) -> None:
            self.starts: dict[int, float] = {}
            self.ends: dict[int, float] = {}

        def _now(self) -> float:
            if cuda:
                import torch

                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.starts[batch_idx] = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends[batch_idx] = self._now()

        def timed(self) -> tuple[float, list[float]]:
            idx = sorted(i for i in self.ends if i >= warmup)
            if not idx:
                raise RuntimeError("no timed step finished")
            window = self.ends[idx[-1]] - self.starts[idx[0]]
            return window, [self.ends[i] - self.starts[i] for i in idx]

    return StepTimer()


def run_variant(variant: str, zero: int, opts: argparse.Namespace, world: dict[str, Any], loader,
                work: Path, tag: str) -> dict[str, Any]:
    """One fit of one variant; tokens/s over the timed steps, peak memory over the whole run."""
    import lightning as L
    import torch
    from benchlib import PeakProbe

    cuda = opts.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    L.seed_everything(opts.seed, verbose=False)
    module = make_module(variant, opts, world, work / f"adapter-{tag}")
    timer = step_timer(opts.warmup, cuda)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=make_strategy(zero, opts.device),
        precision=opts.precision, max_steps=opts.warmup + opts.steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        default_root_dir=str(work / f"trainer-{tag}"), callbacks=[timer],
    )
    with PeakProbe() as probe:
        trainer.fit(module, train_dataloaders=loader)
    window, steps = timer.timed()
    metrics = trainer.callback_metrics
    out = {
        "tokens_per_s": len(steps) * opts.batch * opts.seq / window,
        "window": window,
        "step_median": statistics.median(steps),
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else probe.peak_increase,
        "start_alloc": start_alloc,
        "penalty": float(metrics["train/penalty"]) if "train/penalty" in metrics else None,
        "drift": float(metrics["train/drift_ratio"]) if "train/drift_ratio" in metrics else None,
        "loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
        "lora_dtype": next(str(p.dtype) for p in module.parameters() if p.requires_grad),
    }
    del trainer, module, timer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_strategy(zero: int, opts: argparse.Namespace, world: dict[str, Any], loader, work: Path, log) -> dict:
    variants = [v for v in VARIANTS if not (v == "dense" and zero == 3)]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    for rep in range(opts.repeats):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]  # rotate to cancel position effects
        for variant in order:
            if variant in errors:
                continue
            t0 = time.perf_counter()
            try:
                res = run_variant(variant, zero, opts, world, loader, work, f"z{zero}-{variant}-{rep}")
            except Exception as err:  # report it in the table, go on with the other runs
                traceback.print_exc()
                errors[variant] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                log(f"ZeRO {zero} {variant} repeat {rep}: FAILED ({errors[variant]})")
                continue
            runs[variant].append(res)
            log(f"ZeRO {zero} {variant} repeat {rep}: {res['tokens_per_s']:.1f} tokens/s, peak "
                f"{res['peak_bytes'] / MiB:.1f} MiB ({time.perf_counter() - t0:.1f} s)")
    return {"zero": zero, "variants": variants, "runs": runs, "errors": errors}


# ------------------------------------------------------------------------------------------------ report
def strategy_name(zero: int, device: str) -> str:
    if zero == 0:
        return "Lightning's default single-device strategy"
    cls = "DeepSpeedCPUStrategy" if device == "cpu" else "DeepSpeedStrategy"
    return f"DeepSpeed ZeRO-{zero} (`{cls}(stage={zero})`, devices=1)"


def strategy_report(res: dict[str, Any], opts: argparse.Namespace) -> tuple[list[str], bool]:
    zero, runs, errors = res["zero"], res["runs"], res["errors"]
    cuda = opts.device == "cuda"
    med = {v: statistics.median(r["tokens_per_s"] for r in runs[v]) for v in res["variants"] if runs[v]}
    lines = [
        f"### {strategy_name(zero, opts.device)}",
        "",
        "| variant | tokens/s | ratio vs plain LoRA | peak memory MiB |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        if v not in res["variants"]:
            lines.append(f"| {LABELS[v]} | not run (reads partitioned LoRA factors in training_step under ZeRO-3) "
                         "| | |")
            continue
        if v in errors and not runs[v]:
            lines.append(f"| {LABELS[v]} | failed: {errors[v].replace('|', '/')} | | |")
            continue
        ratio = f"{med[v] / med['plain']:.4f}" if "plain" in med else "n/a"
        peak = max(r["peak_bytes"] for r in runs[v]) / MiB
        lines.append(f"| {LABELS[v]} | {med[v]:.1f} | {ratio} | {peak:.1f} |")
    lines.append("")
    for v in res["variants"]:
        if not runs[v]:
            continue
        r0 = runs[v][-1]
        extra = ""
        if r0["penalty"] is not None:
            extra = f"; penalty at the last step {r0['penalty']:.4g}"
            if r0["drift"] is not None:
                extra += f", drift ratio {r0['drift']:.4g}"
        start = (f"; allocated at run start {max(r['start_alloc'] for r in runs[v]) / MiB:.1f} MiB" if cuda else "")
        lines.append(
            f"- {LABELS[v]}: tokens/s per run " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs[v])
            + f"; median step {1e3 * statistics.median(r['step_median'] for r in runs[v]):.2f} ms; "
            f"LoRA weights {r0['lora_dtype']}; loss at the last step {r0['loss']:.4g}{extra}{start}"
        )
    pa = runs.get("asft", [{}])[0].get("penalty") if runs.get("asft") else None
    pd = runs.get("dense", [{}])[0].get("penalty") if runs.get("dense") else None
    if pa is not None and pd is not None:
        rel = abs(pa - pd) / max(abs(pd), 1e-30)
        lines.append(f"- Same penalty from both paths (first run of each, same seed and batches): AsFT {pa:.6g}, "
                     f"dense {pd:.6g}, relative difference {rel:.2e}")
    if "asft" in med and "plain" in med:
        ratio = med["asft"] / med["plain"]
        met = "met" if ratio >= 0.97 else "**NOT met**"
        note = "" if cuda else " (CPU smoke test: not a result)"
        lines += ["", f"Target AsFT / plain LoRA tokens/s >= 0.97: {ratio:.4f}, {met}{note}."]
    lines.append("")
    return lines, not errors


def machine(opts: argparse.Namespace) -> str:
    import torch
    from benchlib import cpu_model

    if opts.device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name(0)} ({prop.total_memory / 1024**3:.1f} GiB, compute capability "
                f"{prop.major}.{prop.minor}), CUDA {torch.version.cuda}; host {os.cpu_count()} x {cpu_model()}")
    return f"CPU only: {os.cpu_count()} x {cpu_model()}"


def versions(zeros: list[int]) -> str:
    import lightning
    import peft
    import torch
    import transformers

    out = (f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, "
           f"peft {peft.__version__}")
    if any(zeros):
        import deepspeed

        out += f", deepspeed {deepspeed.__version__}"
    return out


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], epilog="Usage: " + __doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b", help="model shape (default 1b)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (default; skipped cleanly without one) or cpu (fp32 smoke runs)")
    p.add_argument("--zero", type=int, nargs="+", choices=[0, 2, 3], default=[0],
                   help="strategies, one table each: 0 = default single device, 2 / 3 = DeepSpeed ZeRO stage")
    p.add_argument("--batch", type=int, help="sequences per step (default 4; tiny: 2)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first (default 5)")
    p.add_argument("--repeats", type=int, help="runs per variant, rotated order (default 3; tiny: 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                   help="base model dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--precision", help="Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha (default 32)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05, as asft fit)")
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="LoRA target modules (default q_proj k_proj v_proj o_proj)")
    p.add_argument("--lam", type=float, default=1.0, help="penalty weight of AsFT and the dense form (default 1)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--direction_dtype", choices=["float32", "bfloat16", "float16"],
                   help="AsFTModule.direction_dtype (default: the LoRA weights' dtype, as asft fit)")
    p.add_argument("--attn_implementation", help="transformers attention kernel (default: transformers' choice)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint the base model's layers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads with --device cpu (default 1: steadier on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="scratch directory for the checkpoints (default: a temporary one, removed)")
    p.add_argument("--out", help="also write the Markdown report to this file (atomically)")
    opts = p.parse_args(argv)
    preset = PRESETS[opts.preset]
    opts.batch = opts.batch or preset["batch"]
    opts.seq = opts.seq or preset["seq"]
    opts.repeats = opts.repeats or preset["repeats"]
    cuda = opts.device == "cuda"
    opts.dtype = opts.dtype or ("bfloat16" if cuda else "float32")
    opts.precision = opts.precision or ("bf16-mixed" if cuda else "32-true")
    if min(opts.batch, opts.seq, opts.steps, opts.repeats, opts.rank) < 1 or opts.warmup < 0:
        p.error("batch, seq, steps, repeats and rank must be >= 1, warmup >= 0")
    opts.zero = list(dict.fromkeys(opts.zero))
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_LINE)
        return 0
    if opts.device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)  # else Lightning's DeepSpeed strategy resets the count
        torch.set_num_threads(opts.threads)
        if any(opts.zero):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(LOCAL_RANK|Checkpoint directory|GPU available|TPU available).*")

    started = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(__file__, REPO)]
                                                              + (sys.argv[1:] if argv is None else argv)))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    from benchlib import git_state, write_report

    tmp = None
    if opts.workdir:
        work = Path(opts.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="asft-gpu-bench-")
        work = Path(tmp.name)
    ok = True
    try:
        world = build_world(opts, work, log)
        loader = make_batches(opts, PRESETS[opts.preset]["config"]["vocab_size"])
        sections: list[str] = []
        for zero in opts.zero:
            res = run_strategy(zero, opts, world, loader, work, log)
            lines, good = strategy_report(res, opts)
            ok = ok and good
            sections += lines
    finally:
        if tmp is not None:
            tmp.cleanup()

    cuda = opts.device == "cuda"
    cfg = PRESETS[opts.preset]["config"]
    title = "# GPU throughput: AsFT vs plain LoRA vs the published dense regulariser"
    head = [title, ""]
    if not cuda:
        head += ["**CPU smoke test, not a result**: checks that the script runs; CPU timings say nothing about GPU "
                 "throughput.", ""]
    head += [
        f"- Command: `{command}` (from the repository root)",
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time "
        f"{(time.perf_counter() - started) / 60:.1f} min",
        f"- Machine: {machine(opts)}; {platform.system()} {platform.release()}, Python {platform.python_version()}"
        + ("" if cuda else f"; {torch.get_num_threads()} torch thread(s); load average at end "
           f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}"),
        f"- Versions: {versions(opts.zero)}; code: git {git_state()}",
        f"- Model: random-init `LlamaForCausalLM`, preset `{opts.preset}` ({world['params'] / 1e6:.1f} M parameters: "
        f"hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} KV heads, vocab {cfg['vocab_size']}), "
        f"dtype {opts.dtype}, precision `{opts.precision}`"
        + (", gradient checkpointing" if opts.gradient_checkpointing else "")
        + (f", attention `{opts.attn_implementation}`" if opts.attn_implementation else ""),
        f"- LoRA r={opts.rank}, alpha={opts.alpha:g}, dropout {opts.dropout:g} on {', '.join(opts.targets)} "
        f"({world['modules']} modules); AdamW lr {opts.lr:g}; lam={opts.lam:g} for AsFT and the dense form",
        f"- Direction: `extract_direction(..., projector='safelora')`, full V stored in float32 "
        f"({world['direction_bytes'] / MiB:.1f} MiB), `asft direction`'s default form; placed on the device in "
        f"{opts.direction_dtype or 'the LoRA weights dtype'}",
        f"- Batches: {opts.batch} x {opts.seq} random tokens ({opts.batch * opts.seq} tokens per step); "
        f"{opts.warmup} warm-up + {opts.steps} timed optimizer steps per run; {opts.repeats} run(s) per variant "
        "in rotated order; tokens/s is the median over runs, the ratio a ratio of medians",
        "- Peak memory: " + ("`torch.cuda.max_memory_allocated()` over the whole run (model load included), reset "
                             "before each run" if cuda else
                             "CPU: peak resident-set increase of the process over the run (VmHWM), not GPU memory"),
        "",
    ]
    write_report("\n".join(head + sections).rstrip() + "\n", opts.out)
    if opts.out:
        log(f"wrote {opts.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
