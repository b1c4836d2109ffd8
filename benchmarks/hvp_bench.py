"""Cost of one Hessian-vector product per method, as a ratio to one forward+backward, on a SmolLM2-135M shape.

Run from the repository root::

    python benchmarks/hvp_bench.py [--quick] [--out benchmarks/results/hvp.md]

A randomly initialised Llama with SmolLM2-135M's shape (saved and reloaded through ``from_pretrained``, eager
attention), LoRA r=8 on q_proj/v_proj with non-zero B, one fixed batch. Timed, interleaved over repeats (medians):
the baseline (forward + backward of the loss w.r.t. the LoRA parameters), and ``asft_lightning.curvature.hvp``
with ``double_backward``, ``finite_difference`` and ``forward_over_reverse``. Target (issue 4): double backward at
most 2.5x the baseline. The three methods are also checked against each other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
from pathlib import Path

import torch
from benchlib import SMOLLM2_135M, command_line, interleaved, machine, table, write_report

from asft_lightning import curvature as cv


def build(quick: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = dict(SMOLLM2_135M)
    if quick:
        shape.update(num_hidden_layers=4)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.01)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, shorter batch, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    batch, seq = (2, 64) if args.quick else (4, 128)
    model = build(args.quick)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, seq), generator=gen)
    params = cv.params_of(model)  # the LoRA factors
    vector = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    loss_fn = cv.functional_loss(model, lambda out: cv.causal_lm_loss(out.logits, ids), kwargs={"input_ids": ids})

    def baseline():
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(leaves)
        torch.autograd.grad(loss, list(leaves.values()))

    runs = {
        "forward+backward (baseline)": baseline,
        "double_backward": lambda: cv.hvp(loss_fn, params, vector, method="double_backward"),
        "finite_difference": lambda: cv.hvp(loss_fn, params, vector, method="finite_difference"),
        "forward_over_reverse": lambda: cv.hvp(loss_fn, params, vector, method="forward_over_reverse"),
    }
    times, _ = interleaved(runs, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward+backward (baseline)"]
    exact = cv.hvp(loss_fn, params, vector, method="double_backward")
    errors = {}
    for method in ("finite_difference", "forward_over_reverse"):
        other = cv.hvp(loss_fn, params, vector, method=method)
        errors[method] = float(cv.norm(cv.sub(other, exact)) / cv.norm(exact))
    n_params = sum(v.numel() for v in params.values())
    lines = [
        "# HVP cost per method (issue 4)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"- command: `{command_line(__file__)}`",
        f"- model: random Llama, SmolLM2-135M shape ({model.base_model.model.config.num_hidden_layers} layers, "
        f"hidden 576), eager attention, LoRA r=8 on q_proj/v_proj ({n_params} parameters), batch {batch} x {seq} "
        f"tokens, {repeats} interleaved repeats (medians)",
        "",
        *table(["method", "median s", "ratio to forward+backward", "rel. error vs double_backward"],
               ([name, f"{value:.3f}", f"{value / base:.2f}x",
                 f"{errors[name]:.1e}" if name in errors else ("0 (reference)" if name == "double_backward" else "")]
                for name, value in med.items())),
    ]
    ratio = med["double_backward"] / base
    lines += ["", f"Target: double backward at most 2.5x a forward+backward: {'met' if ratio <= 2.5 else 'NOT met'} "
              f"({ratio:.2f}x)."]
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
