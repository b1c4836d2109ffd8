"""``asft harm-direction``: the harmful-reference subspace file that ``model.anchor harm_subspace`` trains with.

Two named steps, the ones the README spells out by hand:

1. **harmful fine-tune**: a short LoRA fine-tune of the aligned model on attack-style pairs only (``asft fit
   --model.lam 0 --data.harmful_ratio 1``, seed 0 by default), its adapter kept under ``reference_dir``;
2. **extraction**: ``asft direction --reference harmful --projector subspace --rank k`` of the aligned model against
   that adapter (``V_h = -s B A`` per module, exact), written to ``output`` with ``<output>.json`` beside it.

The defaults are those of the safety benchmark's ``asft_harm`` row (64 pairs, 2 epochs, learning rate 2e-4, rank
8), where the anchor was measured (``benchmarks/results/safety_sweep_harm3.md``). The pairs must be attack-style
data the user may train on, never the prompts the fine-tune will be evaluated on.

Example::

    asft harm-direction --aligned <aligned> --harmful_data attack_pairs.jsonl --task_data task_train.jsonl \\
        --output harm.safetensors
    asft fit --config configs/harm_anchor.yaml --model.model <aligned> --model.direction harm.safetensors ...
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from asft_lightning.errors import ArgumentError, InputNotFoundError, OutputExistsError

__all__ = ["harm_direction"]


def _check(aligned: str, harmful_data: str, task_data: str, output: str, reference_dir: Path, rank: int, n: int,
           epochs: int, learning_rate: float, overwrite: bool) -> None:
    """Every input checked before any model is loaded; one error naming each problem's flag and file."""
    missing = [f"--{flag} {path}" for flag, path in (("aligned", aligned), ("harmful_data", harmful_data),
                                                       ("task_data", task_data)) if not Path(path).exists()]
    if missing:
        raise InputNotFoundError(f"no such file or directory: {', '.join(missing)}")
    problems = []
    for flag, value in (("rank", rank), ("n", n), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"--{flag} must be an integer >= 1, got {value!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        problems.append(f"--learning_rate must be a finite number > 0, got {learning_rate!r}")
    if not output.endswith(".safetensors"):
        problems.append(f"--output {output}: a direction file must end in .safetensors")
    if problems:
        raise ArgumentError("; ".join(problems))
    if not overwrite:
        for flag, path in (("output", Path(output)), ("reference_dir", reference_dir)):
            if path.exists():
                raise OutputExistsError(f"--{flag} {path} exists; pass --overwrite true to replace it")


def harm_direction(
    aligned: str,
    harmful_data: str,
    task_data: str,
    output: str,
    rank: int = 8,
    n: int = 64,
    epochs: int = 2,
    learning_rate: float = 2e-4,
    target_modules: list[str] | str = ["q_proj", "v_proj"],  # noqa: B006 (shown in --help)
    batch_size: int = 8,
    max_length: int = 160,
    val_size: int = 32,
    seed: int = 0,
    reference_dir: str | None = None,
    accelerator: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the harmful-reference subspace for ``asft fit --model.anchor harm_subspace`` in one command.

    Fine-tunes a LoRA adapter of ``aligned`` on ``harmful_data`` only (lam 0, every example a harmful pair), then
    writes the rank-``rank`` subspace of aligned minus that fine-tune (``asft direction --reference harmful
    --projector subspace``) to ``output``. The adapter stays in ``reference_dir``.

    Args:
        aligned: the safety-aligned model the anchored fine-tune will start from (a local Hugging Face
            checkpoint directory, as ``asft direction`` reads it).
        harmful_data: attack-style prompt / response pairs (JSONL, ``prompt`` and ``response``); never the prompts
            the fine-tune will be evaluated on.
        task_data: the task data of the later fit; only ``val_size`` of its rows are read, as the reference
            fine-tune's validation set (no task row is trained on).
        output: the ``.safetensors`` direction file to write (``<output>.json`` beside it).
        rank: k, the subspace's rank per module.
        n: harmful pairs in the reference fine-tune (no more than the file holds).
        epochs: epochs of the reference fine-tune.
        learning_rate: its learning rate.
        target_modules: modules of both the reference adapter and the file; give the later fit the same list.
        batch_size: its batch size.
        max_length: its token limit per example.
        val_size: task rows for its validation loss (0: no validation).
        seed: its seed (data order and LoRA initialisation).
        reference_dir: where the reference fine-tune runs and keeps its adapter (default ``<output>.reference``).
        accelerator: Lightning accelerator of the fine-tune (``auto``, ``cpu``, ``gpu``).
        overwrite: replace an existing ``output`` and delete an existing ``reference_dir`` first.

    Returns:
        ``{"output", "reference_adapter", "rank", "pairs", "epochs", "seed", "modules"}``, also printed as JSON.
    """
    ref = Path(reference_dir) if reference_dir else Path(output + ".reference")
    _check(aligned, harmful_data, task_data, output, ref, rank, n, epochs, learning_rate, overwrite)
    adapter = fine_tune_on_harm(aligned, harmful_data, task_data, ref, n=n, epochs=epochs,
                                learning_rate=learning_rate, target_modules=target_modules, batch_size=batch_size,
                                max_length=max_length, val_size=val_size, seed=seed, accelerator=accelerator)
    result = extract_harm_subspace(aligned, adapter, output, rank, target_modules)
    summary = {"output": output, "reference_adapter": str(adapter), "rank": rank, "pairs": n, "epochs": epochs,
               "seed": seed, "modules": len(result.modules)}
    print(json.dumps(summary, indent=2))
    return summary


def fine_tune_on_harm(aligned: str, harmful_data: str, task_data: str, out: Path, n: int, epochs: int,
                      learning_rate: float, target_modules: list[str] | str, batch_size: int, max_length: int,
                      val_size: int, seed: int, accelerator: str = "auto") -> Path:
    """Step 1: ``asft fit --model.lam 0 --data.harmful_ratio 1`` into ``out``; returns the adapter directory."""
    from asft_lightning.fit_cli import lightning_cli

    if out.exists():
        shutil.rmtree(out)
    modules = target_modules if isinstance(target_modules, str) else "[" + ",".join(target_modules) + "]"
    lightning_cli([
        "fit",
        f"--model.model={aligned}",
        "--model.lam=0",
        f"--model.learning_rate={learning_rate}",
        f"--model.target_modules={modules}",
        f"--model.adapter_output={out / 'adapter'}",
        f"--data.task_data={task_data}",
        f"--data.harmful_data={harmful_data}",
        f"--data.n={n}",
        "--data.harmful_ratio=1",
        f"--data.val_size={val_size}",
        f"--data.max_length={max_length}",
        f"--data.batch_size={batch_size}",
        f"--data.seed={seed}",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *(["--trainer.limit_val_batches=0"] if val_size == 0 else []),
    ])  # fmt: skip
    return out / "adapter"


def extract_harm_subspace(aligned: str, adapter: Path, output: str, rank: int, target_modules: list[str] | str) -> Any:
    """Step 2: the rank-``rank`` subspace of aligned minus the harmful fine-tune, marked ``reference: harmful``."""
    from asft_lightning.direction import extract_direction

    return extract_direction(aligned, str(adapter), output, target_modules=target_modules, projector="subspace",
                             rank=rank, reference="harmful")
