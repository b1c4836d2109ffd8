"""Is the real world's task learnable? A quick plain-LoRA fine-tune of the aligned model on the task, then FA.

    python benchmarks/world_task_check.py --cache .cache/asft-world --steps 100 --lr 2e-4

Runs ``asft fit`` in-process (plain LoRA, lam=0, no harmful data: the question is only whether fine-tuning teaches
the task), then ``asft evaluate`` on ``task_test.jsonl`` with the adapter, and writes
``<cache>/task_check/result.json`` with the zero-shot FA (from world.json) beside the fine-tuned FA.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/asft-world")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--n", type=int, default=800)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args()

    import torch

    from asft_lightning.cli import lightning_cli
    from asft_lightning.evaluate import evaluate
    from asft_lightning.world_data import TASK_LABELS
    from asft_lightning.world_models import auto_threads

    torch.set_num_threads(args.threads or auto_threads())
    root = Path(args.cache).resolve()
    out = root / "task_check"
    start = time.perf_counter()
    lightning_cli(
        [
            "fit",
            f"--model.model={root / 'aligned'}",
            "--model.lam=0",
            "--model.lora_r=8",
            "--model.lora_alpha=32",
            "--model.lora_dropout=0.05",
            f"--model.learning_rate={args.lr}",
            f"--model.adapter_output={out / 'adapter'}",
            f"--data.task_data={root / 'task_train.jsonl'}",
            "--data.harmful_ratio=0",
            f"--data.n={args.n}",
            "--data.val_size=40",
            "--data.max_length=160",
            "--data.batch_size=8",
            f"--trainer.max_steps={args.steps}",
            f"--trainer.default_root_dir={out}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.enable_checkpointing=false",
            "--trainer.val_check_interval=50",
            "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=10",
        ]
    )
    fit_seconds = time.perf_counter() - start
    report = evaluate(
        model=str(root / "aligned"),
        adapter=str(out / "adapter"),
        task_data=str(root / "task_test.jsonl"),
        labels=list(TASK_LABELS),
        output_dir=str(out / "eval"),
        batch_size=32,
        max_new_tokens=args.max_new_tokens,
        verbose=False,
    )
    manifest = json.loads((root / "world.json").read_text())
    zero_shot = manifest.get("measurements", {}).get("aligned", {}).get("task_accuracy")
    result = {
        "steps": args.steps,
        "lr": args.lr,
        "n": args.n,
        "fit_seconds": round(fit_seconds, 1),
        "zero_shot_fa_aligned": zero_shot,
        "fine_tuned_fa": report["fine_tune_accuracy"],
        "gain_points": None if zero_shot is None else round(report["fine_tune_accuracy"] - zero_shot, 2),
        "unanswered": report["counts"]["task_unanswered"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
