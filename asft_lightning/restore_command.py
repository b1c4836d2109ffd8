"""``asft restore``: curvature-aware safety restoration of a fine-tune that already exists (post hoc).

Inputs are only read; the restored adapter is written to a new directory atomically, with a JSON report. The run
is deterministic, so a killed run is safely re-run from the start: its output directory either does not exist yet
or holds the previous complete result.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from asft_lightning.checkpoints import CheckpointError
from asft_lightning.data import load_samples, sample_batches
from asft_lightning.errors import ArgumentError, InputNotFoundError, OutputExistsError
from asft_lightning.fileio import atomic_replace_dir, sha256_file
from asft_lightning.restoration import (
    RestorationConfig,
    RestorationResult,
    StepRecord,
    reference_harmful_loss,
    restore,
)

REPORT_NAME = "restoration_report.json"


def restore_adapter(
    model: str,
    harmful_data: str,
    retain_data: str,
    output: str,
    adapter: str | None = None,
    reference_model: str | None = None,
    refusal_data: str | None = None,
    gguf_file: str | None = None,
    harmful_prompt_column: str = "prompt",
    harmful_response_column: str = "response",
    retain_prompt_column: str = "instruction",
    retain_input_column: str | None = "input",
    retain_response_column: str = "output",
    refusal_prompt_column: str = "prompt",
    refusal_response_column: str = "response",
    num_harmful: int = 64,
    num_retain: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
    template: str | None = None,
    system_prompt: str | None = None,
    dtype: Literal["float32", "bfloat16", "float64"] = "float32",
    lora_r: int = 8,
    lora_alpha: float = 32,
    target_modules: list[str] | str = ["q_proj", "v_proj"],  # noqa: B006 (shown in --help)
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **restoration: Any,
) -> dict[str, Any]:
    """Restore the safety of a LoRA fine-tune post hoc and write the restored adapter (design.md section 4).

    Raises the loss on harmful completions back to the aligned reference's level with curvature-preconditioned,
    trust-region steps that keep the retain loss (see ``asft_lightning.restoration``).

    Example::

        asft restore --model checkpoints/aligned --adapter runs/sft/adapter --harmful_data harmful.jsonl \\
            --retain_data task.jsonl --output runs/sft/adapter-restored

    Args:
        model: base model of the adapter (HF directory, hub id, or .gguf file); or, with no ``adapter``, a full
            fine-tune to restore through a fresh LoRA adapter on top of it.
        harmful_data: harmful prompts with harmful completions (JSON / JSONL / CSV / parquet).
        retain_data: task or benign data whose loss must be kept.
        output: new adapter directory to write (atomically); must not be inside an input.
        adapter: PEFT LoRA adapter directory of the fine-tune (never modified).
        reference_model: the aligned model whose harmful loss is the target; default: ``model`` with the adapter
            disabled (required when ``adapter`` is not given).
        refusal_data: optional harmful prompts with refusals (used when ``refusal_weight > 0``).
        gguf_file: GGUF file name inside ``model`` when ``model`` is a directory.
        harmful_prompt_column: prompt column of ``harmful_data``.
        harmful_response_column: response column of ``harmful_data``.
        retain_prompt_column: prompt (instruction) column of ``retain_data``.
        retain_input_column: optional input column of ``retain_data`` joined to the prompt.
        retain_response_column: response column of ``retain_data``.
        refusal_prompt_column: prompt column of ``refusal_data``.
        refusal_response_column: response column of ``refusal_data``.
        num_harmful: harmful pairs used (the first rows).
        num_retain: retain pairs used (the first rows).
        batch_size: pairs per batch.
        max_length: most tokens per pair.
        template: prompt format string with ``{prompt}`` (default: the tokenizer's chat template), as in training.
        system_prompt: optional system message, as in training.
        dtype: dtype the base model is loaded in.
        lora_r: rank of the fresh adapter when ``adapter`` is not given.
        lora_alpha: alpha of the fresh adapter.
        target_modules: modules of the fresh adapter.
        seed: seed of the fresh adapter's random ``lora_A`` initialisation (``lora_B`` starts at zero, so the
            fresh adapter starts as the full fine-tune itself); fixed so that a re-run restores identically.
        overwrite: replace ``output`` if it exists.
        progress: show a progress bar.
        **restoration: the restoration settings, the fields of :class:`~asft_lightning.restoration.RestorationConfig`
            (``method``, ``solver``, ``max_steps``, ``damping``, ``target_margin``, ``hvp_method``, ...), each its
            own flag.
    """
    config = RestorationConfig(**restoration)
    _check_arguments(config, num_harmful, num_retain, batch_size, max_length, adapter, reference_model, refusal_data)
    out = _check_paths(model, adapter, reference_model, output, overwrite)
    samples = {
        "harmful": load_samples(harmful_data, "harmful_data", harmful_prompt_column, harmful_response_column,
                                limit=num_harmful),
        "retain": load_samples(retain_data, "retain_data", retain_prompt_column, retain_response_column,
                               retain_input_column, limit=num_retain),
        "refusal": load_samples(refusal_data, "refusal_data", refusal_prompt_column, refusal_response_column)
        if refusal_data is not None else None,
    }
    fresh_lora = {"r": lora_r, "lora_alpha": lora_alpha, "target_modules": target_modules, "seed": seed}
    peft_model, tokenizer = _load_fine_tune(model, adapter, gguf_file, getattr(torch, dtype), fresh_lora)
    batches = {name: sample_batches(tokenizer, rows, batch_size, max_length, template, system_prompt) if rows else None
               for name, rows in samples.items()}
    reference_loss = _reference_loss(reference_model, batches["harmful"], getattr(torch, dtype), _device(peft_model))
    result = _restore_with_progress(peft_model, batches, config, reference_loss, progress)
    report = {
        "result": result.to_dict(),
        "inputs": {
            "model": str(model),
            "adapter": adapter,
            "adapter_sha256": _adapter_sha256(adapter),
            "reference_model": reference_model,
            "harmful_data": harmful_data,
            "retain_data": retain_data,
            "refusal_data": refusal_data,
            "num_harmful": len(samples["harmful"]),
            "num_retain": len(samples["retain"]),
        },
        "settings": {"config": asdict(config), "batch_size": batch_size, "max_length": max_length, "dtype": dtype,
                     "fresh_adapter_seed": seed if adapter is None else None},
    }
    _write(peft_model, report, out)
    print(json.dumps(_summary(result, out), indent=2))
    return report


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def _check_arguments(
    config: RestorationConfig,
    num_harmful: int,
    num_retain: int,
    batch_size: int,
    max_length: int,
    adapter: str | None,
    reference_model: str | None,
    refusal_data: str | None,
) -> None:
    """Every argument problem at once, before anything is read."""
    problems = [f"{name} must be >= 1, got {value}"
                for name, value in (("num_harmful", num_harmful), ("num_retain", num_retain), ("batch_size", batch_size))
                if value < 1]
    if max_length < 2:
        problems.append(f"max_length must be >= 2, got {max_length}")
    if adapter is None and reference_model is None:
        problems.append(
            "without --adapter the model is a full fine-tune: give --reference_model (the aligned model), whose "
            "harmful loss is the target; a disabled adapter cannot stand for it"
        )
    if config.refusal_weight > 0 and refusal_data is None:
        problems.append(f"refusal_weight={config.refusal_weight} > 0 needs --refusal_data")
    if problems:
        raise ArgumentError("asft restore: " + "; ".join(problems))


def _check_paths(model: str, adapter: str | None, reference_model: str | None, output: str, overwrite: bool) -> Path:
    """The inputs exist, the output is none of them and is free (or ``overwrite``); returns the output path."""
    for argument, value in (("model", model), ("reference_model", reference_model)):
        if value is not None and not Path(value).expanduser().exists() and value.startswith(("/", ".", "~")):
            raise InputNotFoundError(f"asft restore: {argument}={value!r}: no such file or directory")
    if adapter is not None:
        if not Path(adapter).exists():
            raise InputNotFoundError(f"asft restore: adapter={adapter!r}: no such directory")
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise CheckpointError(f"asft restore: adapter {adapter}: no adapter_config.json (expected a PEFT adapter)")
    out = Path(output)
    for src in (Path(p) for p in (model, adapter, reference_model) if p is not None and Path(p).exists()):
        if out.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(out.resolve()):
            raise ArgumentError(f"asft restore: output {out} must not be inside (or contain) the input {src}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"asft restore: output {out} exists and is not empty; pass --overwrite true")
    return out


def _load_fine_tune(model: str, adapter: str | None, gguf_file: str | None, dtype: torch.dtype,
                    fresh_lora: dict[str, Any]) -> tuple[Any, Any]:
    """The fine-tune as a trainable PEFT model on the device, and its tokenizer.

    With ``adapter``: the base model with that adapter (checked against the base model first). Without: the full
    fine-tune ``model`` under a fresh LoRA adapter (``fresh_lora``: its ``r``, ``lora_alpha``, ``target_modules``,
    and the ``seed`` of its initialisation).
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from asft_lightning.checkpoints import split_gguf
    from asft_lightning.data import _load_tokenizer
    from asft_lightning.evaluate import check_adapter

    path, gguf = split_gguf(model, gguf_file)
    tokenizer = _load_tokenizer(path, gguf)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"gguf_file": gguf} if gguf else {}))
    if adapter is not None:
        check_adapter(adapter, base, model)
        try:
            peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        except Exception as err:
            raise CheckpointError(f"asft restore: adapter {adapter} does not load on {model}: {err}") from err
    else:
        settings = dict(fresh_lora)
        seed = settings.pop("seed", 0)
        lora = LoraConfig(**settings, lora_dropout=0.0, task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):  # the fresh lora_A from this seed, the caller's generator untouched
            torch.manual_seed(seed)
            peft_model = get_peft_model(base, lora)
    return peft_model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _reference_loss(reference_model: str | None, harmful: list, dtype: torch.dtype, device: torch.device) -> float | None:
    """The harmful loss of ``reference_model`` (None without one: the adapter disabled is the reference)."""
    if reference_model is None:
        return None
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_model, dtype=dtype).to(device).eval()
    return reference_harmful_loss(ref, harmful, reference=ref)


def _restore_with_progress(model: Any, batches: dict[str, Any], config: RestorationConfig,
                           reference_loss: float | None, progress: bool) -> RestorationResult:
    """:func:`asft_lightning.restoration.restore` with a progress bar of its steps."""
    if not progress:
        return restore(model, batches["harmful"], batches["retain"], batches["refusal"], config,
                       reference_loss=reference_loss)
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("restoring", total=config.max_steps)

        def on_step(record: StepRecord) -> None:
            bar.update(task, advance=1, description=f"restoring: L_h {record.harmful_loss:.3f} L_t {record.task_loss:.3f}")

        return restore(model, batches["harmful"], batches["retain"], batches["refusal"], config,
                       reference_loss=reference_loss, on_step=on_step)


def _adapter_sha256(adapter: str | None) -> str | None:
    weights = Path(adapter) / "adapter_model.safetensors" if adapter else None
    return sha256_file(weights) if weights is not None and weights.is_file() else None


def _write(model: Any, report: dict[str, Any], out: Path) -> None:
    """The restored adapter and its report, as one directory swapped into place."""

    def build(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, out)


def _summary(result: RestorationResult, out: Path) -> dict[str, Any]:
    return {
        "output": str(out),
        "stop_reason": result.stop_reason,
        "restored": result.restored,
        "harmful_loss": [result.initial_harmful_loss, result.final_harmful_loss],
        "reference_harmful_loss": result.reference_harmful_loss,
        "task_loss": [result.initial_task_loss, result.final_task_loss],
        "steps": len(result.records),
        "seconds": round(result.seconds, 2),
    }
