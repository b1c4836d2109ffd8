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

from asft_lightning.curvature import HVPMethod
from asft_lightning.fileio import sha256_file
from asft_lightning.restoration import RestorationConfig, StepRecord, reference_harmful_loss, restore

REPORT_NAME = "restoration_report.json"


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


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
    method: Literal["curvature", "first_order"] = "curvature",
    solver: Literal["cg", "lbfgs"] = "cg",
    max_steps: int = 10,
    damping: float = 1.0,
    cg_max_iter: int = 10,
    trust_region: float = 0.05,
    max_step_size: float = 10.0,
    refusal_weight: float = 0.0,
    task_loss_budget: float = 0.1,
    target_margin: float = 0.01,
    top_modules: int | None = None,
    hvp_method: HVPMethod = "auto",
    overwrite: bool = False,
    progress: bool = True,
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
        method: ``curvature`` (preconditioned by the task Hessian) or ``first_order`` (baseline).
        solver: ``cg`` (conjugate gradient on HVPs) or ``lbfgs``.
        max_steps: most restoration steps.
        damping: initial damping of ``H_t + damping I`` (> 0; raised on negative curvature).
        cg_max_iter: most CG iterations per step.
        trust_region: ``delta`` of the trust region ``1/2 d^T (H_t + damping I) d <= delta``.
        max_step_size: largest step multiplier ``eta``.
        refusal_weight: weight ``mu`` of the refusal loss in the ascent direction.
        task_loss_budget: most increase of the retain loss (nats).
        target_margin: stop when the harmful loss reaches ``reference - target_margin``; a negative value asks for
            more than the reference (e.g. ``-0.1``: 0.1 nats beyond the aligned model's harmful loss).
        top_modules: update only the modules with the largest influence ``|g_l^T d_l|``.
        hvp_method: ``auto``, ``double_backward``, ``forward_over_reverse`` or ``finite_difference``.
        overwrite: replace ``output`` if it exists.
        progress: show a progress bar.
    """
    from asft_lightning.data import _load_tokenizer, load_samples, sample_batches
    from asft_lightning.fileio import atomic_replace_dir

    # ---- everything cheap first: settings, paths, data -------------------------------------------------
    config = RestorationConfig(
        method=method, solver=solver, max_steps=max_steps, damping=damping, cg_max_iter=cg_max_iter,
        trust_region=trust_region, max_step_size=max_step_size, refusal_weight=refusal_weight,
        task_loss_budget=task_loss_budget, target_margin=target_margin, top_modules=top_modules,
        hvp_method=hvp_method,
    )
    problems = []
    for name, value in (("num_harmful", num_harmful), ("num_retain", num_retain), ("batch_size", batch_size)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if max_length < 2:
        problems.append(f"max_length must be >= 2, got {max_length}")
    if adapter is None and reference_model is None:
        problems.append(
            "without --adapter the model is a full fine-tune: give --reference_model (the aligned model), whose "
            "harmful loss is the target; a disabled adapter cannot stand for it"
        )
    if problems:
        raise ValueError("asft restore: " + "; ".join(problems))
    out = Path(output)
    inputs = [Path(p) for p in (model, adapter, reference_model) if p is not None and Path(p).exists()]
    for src in inputs:
        if _inside(out, src) or _inside(src, out):
            raise ValueError(f"asft restore: output {out} must not be inside (or contain) the input {src}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"asft restore: output {out} exists and is not empty; pass --overwrite true")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"asft restore: adapter {adapter}: no adapter_config.json (expected a PEFT adapter)")
    harmful_samples = load_samples(harmful_data, "harmful_data", harmful_prompt_column, harmful_response_column,
                                   limit=num_harmful)
    retain_samples = load_samples(retain_data, "retain_data", retain_prompt_column, retain_response_column,
                                  retain_input_column, limit=num_retain)
    refusal_samples = None
    if refusal_data is not None:
        refusal_samples = load_samples(refusal_data, "refusal_data", refusal_prompt_column, refusal_response_column)
    elif refusal_weight > 0:
        raise ValueError(f"asft restore: refusal_weight={refusal_weight} > 0 needs --refusal_data")

    # ---- models -----------------------------------------------------------------------------------------
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from asft_lightning.checkpoints import split_gguf
    from asft_lightning.evaluate import check_adapter

    torch_dtype = getattr(torch, dtype)
    path, gguf = split_gguf(model, gguf_file)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, **({"gguf_file": gguf} if gguf else {})}
    tokenizer = _load_tokenizer(path, gguf)
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter is not None:
        check_adapter(adapter, base, model)
        try:
            peft_model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        except Exception as err:
            raise ValueError(f"asft restore: adapter {adapter} does not load on {model}: {err}") from err
    else:
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peft_model.to(device)

    def batches(samples):
        return sample_batches(tokenizer, samples, batch_size, max_length, template, system_prompt)

    harmful, retain = batches(harmful_samples), batches(retain_samples)
    refusal = batches(refusal_samples) if refusal_samples else None
    reference_loss = None
    if reference_model is not None:
        ref = AutoModelForCausalLM.from_pretrained(reference_model, dtype=torch_dtype).to(device).eval()
        reference_loss = reference_harmful_loss(ref, harmful, reference=ref)
        del ref

    # ---- restoration -----------------------------------------------------------------------------------
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        task = bar.add_task("restoring", total=config.max_steps)
        bar.start()

    def on_step(record: StepRecord) -> None:
        if bar is not None:
            bar.update(task, advance=1, description=f"restoring: L_h {record.harmful_loss:.3f} L_t {record.task_loss:.3f}")

    try:
        result = restore(peft_model, harmful, retain, refusal, config, reference_loss=reference_loss, on_step=on_step)
    finally:
        if bar is not None:
            bar.stop()

    report = {
        "result": result.to_dict(),
        "inputs": {
            "model": str(model),
            "adapter": adapter,
            "adapter_sha256": sha256_file(Path(adapter) / "adapter_model.safetensors")
            if adapter and (Path(adapter) / "adapter_model.safetensors").is_file() else None,
            "reference_model": reference_model,
            "harmful_data": harmful_data,
            "retain_data": retain_data,
            "refusal_data": refusal_data,
            "num_harmful": len(harmful_samples),
            "num_retain": len(retain_samples),
        },
        "settings": {"config": asdict(config), "batch_size": batch_size, "max_length": max_length, "dtype": dtype},
    }

    def build(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    atomic_replace_dir(build, out)
    summary = {
        "output": str(out),
        "stop_reason": result.stop_reason,
        "restored": result.restored,
        "harmful_loss": [result.initial_harmful_loss, result.final_harmful_loss],
        "reference_harmful_loss": result.reference_harmful_loss,
        "task_loss": [result.initial_task_loss, result.final_task_loss],
        "steps": len(result.records),
        "seconds": round(result.seconds, 2),
    }
    print(json.dumps(summary, indent=2))
    return report
