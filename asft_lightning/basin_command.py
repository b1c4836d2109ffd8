"""``asft basin curves`` and ``asft basin attribute``: test AsFT's narrow-safety-basin premise on a model.

* ``curves`` perturbs the aligned model (or the model with an adapter merged) along ``+V``, ``-V`` and random
  directions orthogonal to V's top-k subspace, inside it, and Gaussian, over a grid of step sizes, and measures the
  refusal margin and the harmful loss at every point (HS and the benign refusal rate at ``--hs_steps``): a chart
  like the AsFT paper's Figure 1, a JSON, a Markdown summary and a verdict.
* ``attribute`` splits a fine-tune's update (a LoRA adapter on any modules, or a full fine-tune against the aligned
  model) per module into its component along V, the rest inside V's top-k subspace and the part orthogonal to it,
  applies each part alone and the update minus each part to the aligned model, and measures margin, HS and FA: a
  table, a bar chart per module group and a verdict on which part carried the harm and which the task.

The math and the loops are in :mod:`asft_lightning.basin`. Every input is checked before a model is loaded (the
direction against the model's module names and shapes, the adapter against the base, the grid, the probe files);
the model's weights are changed in memory only and restored bit for bit; nothing is written into the inputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from asft_lightning import basin as B
from asft_lightning.checkpoints import CheckpointError, CheckpointReader, architecture_fingerprint, split_gguf
from asft_lightning.direction import DirectionError, DirectionSet, load_direction, module_matches
from asft_lightning.errors import ArgumentError, DataError, InputNotFoundError
from asft_lightning.fileio import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = ["attribute", "curves"]

DEFAULT_STEPS = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MAX_LABELS = 64


# --------------------------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------------------------


def _positive(problems: list[str], **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1, got {value}")


def _model_paths(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    model_dir, gguf = split_gguf(model, gguf_file)
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"--model {model!r}: no such directory or file ({path.absolute()})")
    if gguf is not None and not (path / gguf).is_file():
        raise InputNotFoundError(f"--model {model!r} --gguf_file {gguf!r}: GGUF file not found ({path / gguf})")
    return model_dir, gguf


def _meta_model(model_dir: str, gguf: str | None, model: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model's architecture on the meta device (no weights read): for checking names and shapes up front."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(model_dir, **kwargs)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise CheckpointError(f"--model {model!r}: could not read it as a causal LM ({err})") from err
    return meta, architecture_fingerprint(config.to_dict())


def _linear_shapes(meta: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of the model's ``nn.Linear`` layers."""
    return {
        name: (m.out_features, m.in_features) for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear)
    }


def _check_direction(
    directions: DirectionSet, shapes: dict[str, tuple[int, int]], fingerprint: dict[str, Any], model: str, rank: int
) -> None:
    """The direction file must store V for modules of this model with the same shapes, and leave room for ``rank``."""
    directions.check_model(fingerprint, f"--model {model!r}")
    path = directions.path
    missing = [n for n in directions.modules if n not in shapes]
    if missing:
        example = next((s for s in shapes if s.endswith(missing[0].rsplit(".", 1)[-1])), next(iter(shapes), None))
        raise DirectionError(
            f"--direction {path}: {len(missing)} of its modules are not linear layers of --model {model!r}, e.g. "
            f"{missing[:3]} (the model has e.g. {example!r}); was the direction made for another model?"
        )
    for name, md in directions.modules.items():
        if tuple(md.shape) != tuple(shapes[name]):
            raise DirectionError(
                f"--direction {path}: module {name} has shape {tuple(md.shape)} in the direction file but "
                f"{tuple(shapes[name])} in --model {model!r}; was the direction made for another model?"
            )
        if md.direction is None:
            raise DirectionError(
                f"--direction {path}: module {name} stores only V's top singular vectors (made with --projector "
                "subspace, --rank or --energy); asft basin needs V itself: make the file with `asft direction` "
                "without --rank / --energy"
            )
    smallest = min(directions.modules.values(), key=lambda m: min(m.shape))
    d_out, d_in = smallest.shape
    if rank >= d_out or rank > d_in:
        raise ArgumentError(
            f"--rank {rank}: V's top-k subspace must leave room for directions orthogonal to it, so k must be "
            f"below every module's output size and at most its input size; module {smallest.name} is "
            f"{d_out} x {d_in}: choose --rank < {min(d_out, d_in + 1)}"
        )


def _check_output(output_dir: str, inputs: dict[str, str | None]) -> Path:
    out = Path(output_dir).expanduser()
    for flag, value in inputs.items():
        if value is None:
            continue
        src = Path(value).expanduser()
        if src.is_dir():
            try:
                out.resolve().relative_to(src.resolve())
            except ValueError:
                continue
            raise ArgumentError(f"--output_dir {output_dir!r} is inside --{flag} {value!r}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--output_dir {output_dir!r} exists and is not a directory")
    return out


def _labels(source: str, column: str) -> list[str]:
    from asft_lightning.data import _load_table, _text

    table = _load_table(source, "task_data", {"task_response_column": column}, None)
    seen: dict[str, str] = {}
    for value in table[column]:
        text = _text(value)
        if text is not None and text.strip():
            seen.setdefault(text.strip().lower(), text.strip())
    if len(seen) > MAX_LABELS:
        raise DataError(
            f"--task_data {source!r}: column {column!r} has {len(seen)} distinct answers, too many for label accuracy "
            f"(at most {MAX_LABELS}); pass --labels, or --task_mode numeric"
        )
    return sorted(seen.values(), key=str.lower)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _load_model(model_dir: str, gguf: str | None, model: str, dtype: str, device: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as err:
        raise CheckpointError(f"--model {model!r}: could not load it as a causal LM ({err})") from err
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.to(target).eval().requires_grad_(False)
    return lm


def _lora_updates(lm: torch.nn.Module, adapter: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """Load a LoRA adapter onto ``lm``, read every module's ``(A, B, scaling)`` and take the adapter off again.

    Returns the base model (its weights untouched), ``{module: () -> dW}`` with ``dW = scaling * B A`` in float64,
    and notes (modules_to_save, rank).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = PeftModel.from_pretrained(lm, adapter, is_trainable=False)
    except Exception as err:
        raise CheckpointError(f"--adapter {adapter!r}: PEFT could not load it onto the model ({err})") from err
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
            continue
        base = name[len(prefix) :] if name.startswith(prefix) else name
        if getattr(module, "use_dora", {}).get("default", False):
            raise ArgumentError(f"--adapter {adapter!r}: module {base} is a DoRA layer; only plain LoRA is supported")
        a = module.lora_A["default"].weight.detach().to("cpu", torch.float64).clone()
        b = module.lora_B["default"].weight.detach().to("cpu", torch.float64).clone()
        factors[base] = (a, b, float(module.scaling["default"]), bool(getattr(module, "fan_in_fan_out", False)))
    config = peft_model.peft_config["default"]
    notes = {"modules_to_save": sorted(config.modules_to_save or []), "rank": config.r, "lora_alpha": config.lora_alpha}
    lm = peft_model.unload()
    if not factors:
        raise CheckpointError(f"--adapter {adapter!r}: no LoRA layers found in it")

    def delta(name: str) -> Any:
        a, b, scaling, transpose = factors[name]

        def get() -> torch.Tensor:
            d = scaling * (b @ a)
            return d.T if transpose else d

        return get

    return lm, {n: delta(n) for n in sorted(factors, key=_natural)}, notes


def _natural(name: str) -> list[Any]:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _full_updates(
    lm: torch.nn.Module, fine_tuned: str, target_modules: list[str] | str | None, model: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{module: () -> dW}`` with ``dW = W_fine_tuned - W_model`` for every linear module that changed."""
    reader = CheckpointReader(fine_tuned)
    mine = architecture_fingerprint(lm.config.to_dict())
    theirs = architecture_fingerprint(reader.config)
    if mine != theirs:
        diff = ", ".join(f"{k}: {mine.get(k)} vs {theirs.get(k)}" for k in sorted(set(mine) | set(theirs))
                         if mine.get(k) != theirs.get(k))  # fmt: skip
        raise CheckpointError(
            f"--fine_tuned {fine_tuned!r} is not a fine-tune of --model {model!r}: different architectures ({diff})"
        )
    keys = set(reader.keys())
    linear = {n: m for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    if target_modules is not None:
        linear = {n: m for n, m in linear.items() if module_matches(n, target_modules)}
        if not linear:
            raise ArgumentError(f"--target_modules {target_modules!r} match no linear layer of --model {model!r}")
    originals: dict[str, torch.Tensor] = {}
    for name, module in linear.items():
        key = f"{name}.weight"
        if key not in keys:
            raise CheckpointError(f"--fine_tuned {fine_tuned!r}: tensor {key!r} missing (present in --model)")
        if tuple(reader.shape(key)) != tuple(module.weight.shape):
            raise CheckpointError(
                f"--fine_tuned {fine_tuned!r}: tensor {key!r} has shape {tuple(reader.shape(key))}, but "
                f"{tuple(module.weight.shape)} in --model {model!r}"
            )
        theirs_w = reader.get(key)
        if not torch.equal(theirs_w.to(module.weight.dtype), module.weight.detach().cpu()):
            originals[name] = module.weight.detach().to("cpu").clone()
    state = lm.state_dict()
    others = []
    for key in sorted(keys):
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        if base in linear or key not in state or tuple(reader.shape(key)) != tuple(state[key].shape):
            continue
        if not torch.equal(reader.get(key).to(state[key].dtype), state[key].detach().cpu()):
            others.append(key)
    if not originals:
        raise ArgumentError(f"--fine_tuned {fine_tuned!r}: no linear weight differs from --model {model!r}")

    def delta(name: str) -> Any:
        def get() -> torch.Tensor:
            return reader.get(f"{name}.weight").to(torch.float64) - originals[name].to(torch.float64)

        return get

    notes = {"changed_outside_linear_layers": others, "note": "changes outside the linear layers are not applied"}
    return {n: delta(n) for n in sorted(originals, key=_natural)}, notes


def _probes(
    tokenizer: Any,
    pairs: list,
    *,
    batch_size: int,
    max_length: int,
    answer_tokens: int | None,
    template: str | None,
    system_prompt: str | None,
    hs_prompts: list[str],
    benign: list[str],
    task_samples: list,
    task_loss: bool,
    task_generation: bool,
    labels: list[str] | None,
    task_mode: str,
    judge: Any,
    max_new_tokens: int,
    task_max_new_tokens: int,
) -> B.Probes:
    from asft_lightning.data import encode_example, encode_prompts
    from asft_lightning.margin import encode_pairs
    from asft_lightning.metrics import TaskAccuracy

    probes = B.Probes(
        tokenizer=tokenizer,
        pairs=pairs,
        encoded=encode_pairs(tokenizer, pairs, template, system_prompt, max_length, answer_tokens),
        batch_size=batch_size,
        harmful_prompts=hs_prompts,
        harmful_ids=encode_prompts(tokenizer, hs_prompts, template, system_prompt),
        benign_prompts=benign,
        benign_ids=encode_prompts(tokenizer, benign, template, system_prompt),
        judge=judge,
        max_new_tokens=max_new_tokens,
        task_max_new_tokens=task_max_new_tokens,
    )
    if task_loss:
        probes.task_examples = []
        for s in task_samples:
            ex = encode_example(tokenizer, s.prompt, s.response, template, system_prompt, max_length)
            ex.pop("truncated")
            probes.task_examples.append(ex)
    if task_generation and task_samples:
        probes.task_prompt_ids = encode_prompts(tokenizer, [s.prompt for s in task_samples], template, system_prompt)
        probes.task_targets = [s.response for s in task_samples]
        probes.accuracy_factory = lambda: TaskAccuracy(task_mode, labels)
    return probes


def _pick(rows: list, limit: int | None, sample_seed: int | None, key: str) -> list:
    """``limit`` rows: a seeded random sample (the world's files are ordered by source and kind, so their first rows
    are not a fair sample), in the sampled order; ``sample_seed=None``: the first rows."""
    import random

    if limit is None or limit >= len(rows):
        limit = len(rows)
    if sample_seed is None:
        return rows[:limit]
    order = list(range(len(rows)))
    random.Random(f"asft-basin/{key}/{sample_seed}").shuffle(order)
    return [rows[i] for i in order[:limit]]


def _task_samples(
    task_data: str | None, limit: int, columns: tuple[str, str | None, str], sample_seed: int | None
) -> list:
    if task_data is None:
        return []
    from asft_lightning.data import load_samples

    prompt, extra, response = columns
    return _pick(load_samples(task_data, "task_data", prompt, response, extra), limit, sample_seed, "task")


@dataclass
class _Setup:
    """What both commands measure with, loaded after every input has been checked."""

    directions: DirectionSet
    pairs: list
    """The margin rows (a seeded sample of --limit rows of --harmful_data)."""
    hs_prompts: list[str]
    benign: list[str]
    task_samples: list
    labels: list[str] | None
    judge: Any
    probes: B.Probes
    lm: torch.nn.Module


def _setup(
    a: SimpleNamespace, model_dir: str, gguf: str | None, *, hs: bool, benign: bool, task: bool,
    task_generation: bool, seed: int, hs_limit: int | None = None, task_mode: str = "label",
    labels: list[str] | None = None, task_max_new_tokens: int = 8,
) -> _Setup:
    """Check and read the inputs shared by ``curves`` and ``attribute`` (``a``: the command's arguments), then load.

    Before any model is loaded: the direction file, the probe rows (each file a seeded sample, ``--sample_seed``),
    the judge's path, the direction and the adapter against the model's modules and shapes (on the meta device).
    Then the tokenizer, the judge, the tokenised probes and the model.

    Args:
        hs: Measure HS: harmful prompts to answer, and --judge checked and loaded.
        benign: Read --benign_data (when given) for the benign refusal rate.
        task: Read --task_data (when given).
        task_generation: Task examples are answered (FA, with labels defaulting to the file's answers); else scored
            by teacher-forced loss.
        seed: Torch seed set before the tokenizer and model load.
        hs_limit: The HS prompts are a sample of this many rows of --harmful_data; None: the margin rows'.
    """
    from asft_lightning.adapter_check import check_adapter
    from asft_lightning.data import _load_tokenizer, load_prompts
    from asft_lightning.margin import load_margin_pairs
    from asft_lightning.metrics import judge_kind, load_judge

    directions = load_direction(a.direction)
    every_pair = load_margin_pairs(a.harmful_data, "harmful_data", a.prompt_column, a.refusal_column,
                                   a.compliance_column)  # fmt: skip
    pairs = _pick(every_pair, a.limit, a.sample_seed, "harmful")
    hs_rows = pairs if hs_limit is None else _pick(every_pair, hs_limit, a.sample_seed, "harmful")
    hs_prompts = [p.prompt for p in hs_rows] if hs else []
    benign_prompts = (
        _pick(load_prompts(a.benign_data, "benign_data", a.benign_prompt_column, "benign_prompt_column"),
              a.benign_limit, a.sample_seed, "benign")
        if a.benign_data and benign
        else []
    )  # fmt: skip
    columns = (a.task_prompt_column, a.task_input_column, a.task_response_column)
    task_samples = _task_samples(a.task_data, a.task_limit, columns, a.sample_seed) if task else []
    if task_generation and task_samples and task_mode == "label" and labels is None:
        labels = _labels(a.task_data, a.task_response_column)
    if hs:
        judge_kind(a.judge)
    meta, fingerprint = _meta_model(model_dir, gguf, a.model)
    _check_direction(directions, _linear_shapes(meta), fingerprint, a.model, a.rank)
    if a.adapter is not None:
        check_adapter(a.adapter, meta, a.model)
    del meta

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    torch.manual_seed(seed)
    tokenizer = _load_tokenizer(model_dir, gguf)
    judge = (
        load_judge(a.judge, case_sensitive=a.case_sensitive, batch_size=a.batch_size, device=a.device)
        if hs
        else None
    )
    probes = _probes(
        tokenizer, pairs, batch_size=a.batch_size, max_length=a.max_length, answer_tokens=a.answer_tokens,
        template=a.template, system_prompt=a.system_prompt, hs_prompts=hs_prompts, benign=benign_prompts,
        task_samples=task_samples,
        task_loss=not task_generation, task_generation=task_generation, labels=labels, task_mode=task_mode,
        judge=judge, max_new_tokens=a.max_new_tokens, task_max_new_tokens=task_max_new_tokens,
    )  # fmt: skip
    lm = _load_model(model_dir, gguf, a.model, a.dtype, a.device)
    return _Setup(directions, pairs, hs_prompts, benign_prompts, task_samples, labels, judge, probes, lm)


def _sha(path: str | None) -> str | None:
    return sha256_file(path) if path and Path(path).is_file() else None


def _write(out: Path, stem: str, report: dict[str, Any], png: bytes, markdown: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{stem}.json", "png": out / f"{stem}.png", "markdown": out / f"{stem}.md"}
    atomic_write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", files["json"])
    atomic_write_bytes(png, files["png"])
    atomic_write_text(markdown, files["markdown"])
    return {k: str(v) for k, v in files.items()}


def _versions() -> dict[str, str]:
    import transformers

    from asft_lightning import __version__

    return {"asft_lightning": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _num(value: Any, digits: int = 3) -> str:
    return "" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


# --------------------------------------------------------------------------------------------------------------
# asft basin curves
# --------------------------------------------------------------------------------------------------------------


def curves(
    model: str,
    direction: str,
    harmful_data: str,
    output_dir: str,
    benign_data: str | None = None,
    task_data: str | None = None,
    adapter: str | None = None,
    gguf_file: str | None = None,
    steps: list[float] = DEFAULT_STEPS,  # noqa: B006 (shown in --help)
    families: list[str] = list(B.FAMILIES),  # noqa: B006
    draws: int = 5,
    rank: int = 32,
    seed: int = 0,
    limit: int | None = 16,
    sample_seed: int | None = 0,
    hs_steps: list[float] | None = None,
    hs_draws: int = 1,
    hs_limit: int = 32,
    benign_limit: int = 32,
    task_limit: int = 16,
    max_new_tokens: int = 32,
    tolerance: float | None = None,
    judge: str = "keyword",
    case_sensitive: bool = True,
    batch_size: int = 8,
    max_length: int = 256,
    answer_tokens: int | None = 32,
    template: str | None = None,
    system_prompt: str | None = None,
    prompt_column: str = "prompt",
    refusal_column: str = "refusal",
    compliance_column: str = "compliance",
    benign_prompt_column: str = "prompt",
    task_prompt_column: str = "instruction",
    task_input_column: str | None = "input",
    task_response_column: str = "output",
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Perturbation curves: safety of the model at W + t D along +V, -V and random directions (AsFT's Figure 1).

    For every step t of the grid and every direction family, each module of the direction file is moved to
    W + t D, with D scaled per module to ||V||_F (so t is in units of ||V||_F; along -V, t = 1 undoes the alignment
    step when the direction was made from this model). Families: +V, -V, orthogonal (random, orthogonal to V's top-k
    subspace), subspace (random, inside it and orthogonal to V), gaussian (random). At every point: the refusal
    margin (teacher-forced log-likelihood of a refusal minus that of a compliant answer, nats per token) and the
    harmful loss on the first --limit rows of --harmful_data, the task loss with --task_data; at --hs_steps also HS
    (and the benign refusal rate with --benign_data) from greedy generation and the judge. Weights are changed in
    place and restored bit for bit (checked at the end); the inputs are never written. Writes basin_curves.json,
    basin_curves.png and basin_curves.md into --output_dir and prints a verdict.

    Example::

        asft basin curves --model world/aligned --direction world/direction.safetensors \\
            --harmful_data world/harmful_eval.jsonl --output_dir runs/basin

    Args:
        model: The aligned model: a Hugging Face directory or a .gguf file.
        direction: Direction file of `asft direction` for this model, storing V (no --rank / --energy).
        harmful_data: Harmful prompts with a fixed refusal and a compliant answer per row (the world's
            harmful_eval.jsonl).
        output_dir: Where the JSON, PNG and Markdown files go.
        benign_data: Benign prompts, for the benign refusal rate at --hs_steps.
        task_data: Task examples (instruction / input / output) for the teacher-forced task loss at every point.
        adapter: A PEFT LoRA adapter of --model to start from (merged into the weights in memory).
        gguf_file: GGUF file inside --model when it is a directory.
        steps: The grid of step sizes t (units of ||V||_F per module); must contain 0 and be finite.
        families: Direction families: +V, -V, orthogonal, subspace, gaussian.
        draws: Seeded draws per random family (orthogonal, subspace, gaussian).
        rank: k, the number of top left singular vectors of V that span V's subspace.
        seed: Seed of the random directions.
        limit: Rows of --harmful_data for the margin and the harmful loss (None: all).
        sample_seed: Rows of every probe file are a random sample drawn with this seed (the world's files are
            ordered by source and kind); None: the first rows.
        hs_steps: Steps (on the grid) at which HS and the benign refusal rate are also measured (generation).
        hs_draws: At --hs_steps, the first this many draws of each random family get HS.
        hs_limit: Harmful prompts for HS.
        benign_limit: Benign prompts for the benign refusal rate.
        task_limit: Task examples for the task loss.
        max_new_tokens: New tokens per generation for HS.
        tolerance: The margin drop (nats/token) that counts as losing safety in the verdict; default: half the
            drop along -V at t = 1.
        judge: keyword, a refusal-judge directory, or a judge model directory (as asft evaluate).
        case_sensitive: Keyword judge: match case as GCG does.
        batch_size: Prompt pairs per forward pass (prompts per generation batch).
        max_length: Most tokens per teacher-forced sequence.
        answer_tokens: Score only the first this many tokens of each fixed answer in the margin and the
            harmful loss (the safety benchmark's margin; None: whole answers, 1.4x the time a point on the
            world).
        template: Prompt format string with {prompt} (default: the tokenizer's chat template).
        system_prompt: Optional system message.
        prompt_column: Prompt column of --harmful_data.
        refusal_column: Refusal column of --harmful_data.
        compliance_column: Compliant-answer column of --harmful_data.
        benign_prompt_column: Prompt column of --benign_data.
        task_prompt_column: Instruction column of --task_data.
        task_input_column: Input column of --task_data (joined to the instruction).
        task_response_column: Answer column of --task_data.
        dtype: Model dtype.
        device: Torch device (default: cuda if available, else cpu).
        threads: Torch CPU threads (default: torch's choice).
        progress: Show a progress bar.
    """
    a = SimpleNamespace(**locals())  # the arguments, for the checks and loading both commands share
    clock = time.perf_counter()
    problems: list[str] = []
    _positive(problems, draws=draws, rank=rank, limit=limit, answer_tokens=answer_tokens, hs_draws=hs_draws,
              hs_limit=hs_limit, benign_limit=benign_limit, task_limit=task_limit, batch_size=batch_size,
              max_new_tokens=max_new_tokens, threads=threads)  # fmt: skip
    if tolerance is not None and not (tolerance > 0 and tolerance < float("inf")):
        problems.append(f"--tolerance must be a positive number, got {tolerance}")
    unknown = [f for f in families if f not in B.FAMILIES]
    if unknown or not families:
        problems.append(f"--families: unknown {unknown}; choose from {list(B.FAMILIES)}")
    elif len(set(families)) != len(families):
        problems.append(f"--families repeats a family: {families}")
    if problems:
        raise ArgumentError("; ".join(problems))
    grid = B.check_steps(steps, "steps")
    hs_grid = B.check_steps(hs_steps, "hs_steps") if hs_steps else []
    if set(hs_grid) - set(grid):
        raise ArgumentError(f"--hs_steps {sorted(set(hs_grid) - set(grid))} are not on the grid --steps {grid}")
    model_dir, gguf = _model_paths(model, gguf_file)
    out = _check_output(output_dir, {"model": model_dir, "adapter": adapter})
    setup = _setup(a, model_dir, gguf, hs=bool(hs_grid), benign=True, task=True, task_generation=False, seed=seed,
                   hs_limit=hs_limit)  # fmt: skip
    directions, pairs, probes, lm, judge_obj = setup.directions, setup.pairs, setup.probes, setup.lm, setup.judge
    hs_prompts, benign, task_samples = setup.hs_prompts, setup.benign, setup.task_samples
    if adapter is not None:
        from peft import PeftModel

        try:
            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=False).merge_and_unload()
        except Exception as err:
            raise ArgumentError(f"--adapter {adapter!r}: PEFT could not merge it into --model ({err})") from err
        lm.eval().requires_grad_(False)
    bases = B.build_bases(directions, rank)
    load_seconds = time.perf_counter() - clock

    results = B.run_curves(lm, bases, probes, grid, families, draws, seed, hs_grid, hs_draws, progress)
    verdict = B.curves_verdict(results, tolerance, rank)
    report = {
        "command": "asft basin curves",
        "verdict": verdict,
        **results,
        "settings": {
            "model": model, "gguf_file": gguf, "adapter": adapter, "direction": direction,
            "direction_modules": len(directions.modules), "direction_target_modules":
                directions.metadata.get("target_modules"), "rank": rank, "families": list(families),
            "draws": draws, "seed": seed, "steps": grid, "hs_steps": hs_grid, "hs_draws": hs_draws,
            "harmful_data": harmful_data, "harmful_data_sha256": _sha(harmful_data), "margin_prompts": len(pairs),
            "sample_seed": sample_seed, "margin_rows": [p.row for p in pairs],
            "hs_prompts": len(hs_prompts), "benign_data": benign_data, "benign_prompts": len(benign),
            "task_data": task_data, "task_examples": len(task_samples), "max_new_tokens": max_new_tokens,
            "judge": judge_obj.describe() if judge_obj is not None and hasattr(judge_obj, "describe") else judge,
            "batch_size": batch_size, "max_length": max_length, "answer_tokens": answer_tokens,
            "template": template, "system_prompt": system_prompt,
            "dtype": dtype, "device": str(next(lm.parameters()).device), "threads": torch.get_num_threads(),
            "units": "t in units of ||V_l||_F per module: W_l <- W_l + t * D_l with ||D_l||_F = ||V_l||_F",
        },  # fmt: skip
        "versions": _versions(),
    }
    report["seconds"] = {"load": round(load_seconds, 2), "sweep": results["seconds"],
                         "total": round(time.perf_counter() - clock, 2)}  # fmt: skip
    if not all(v for k, v in results["undo_check"].items() if k.endswith("_equal")):
        raise RuntimeError(f"the weights were not restored exactly: {results['undo_check']}")  # a bug, not bad input
    title = f"{Path(model_dir).name}: V on {len(directions.modules)} modules, k = {rank}"
    files = _write(out, "basin_curves", report, B.plot_curves(report, title), _curves_markdown(report))
    print(_curves_markdown(report, brief=True))
    print(f"wrote {files['json']}, {files['png']}, {files['markdown']}")
    return report


def _curves_markdown(report: dict[str, Any], brief: bool = False) -> str:
    fams = report["families"]
    steps = report["steps"]
    lines = [] if brief else ["# asft basin curves", ""]
    lines += ["Mean refusal margin (nats/token) over draws per family and step t:", ""]
    lines += ["| family | draws | " + " | ".join(f"t={t:g}" for t in steps) + " |",
              "|---|---|" + "---|" * len(steps)]  # fmt: skip
    for family, entry in fams.items():
        by_t = {r["t"]: r for r in entry["summary"]}
        cells = []
        for t in steps:
            r = by_t.get(t, {})
            cell = _num(r.get("margin"))
            if r.get("margin_sd") is not None:
                cell += f" ± {r['margin_sd']:.3f}"
            cells.append(cell)
        lines.append(f"| {family} | {entry['draws']} | " + " | ".join(cells) + " |")
    hs_rows = [(f, r) for f, e in fams.items() for r in e["summary"] if "harmful_score" in r]
    if hs_rows:
        lines += ["", "HS (% answered) and benign refusal (%) at the HS steps:", "",
                  "| family | t | HS | benign refusal |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {f} | {r['t']:g} | {_num(r.get('harmful_score'), 1)} | {_num(r.get('benign_refusal'), 1)} |"
                  for f, r in hs_rows]  # fmt: skip
    if not brief:
        s = report["settings"]
        lines += ["", f"Baseline: {json.dumps({k: v for k, v in report['baseline'].items()})}", "",
                  f"Settings: model `{s['model']}`, adapter `{s['adapter']}`, direction `{s['direction']}` "
                  f"({s['direction_modules']} modules), k = {s['rank']}, {s['margin_prompts']} margin prompts, "
                  f"seed {s['seed']}; {report['seconds']['total']} s in all ({report['seconds']['sweep']} s sweep)."]  # fmt: skip
    lines += ["", "Verdict: " + report["verdict"]["text"], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# asft basin attribute
# --------------------------------------------------------------------------------------------------------------


def attribute(
    model: str,
    direction: str,
    harmful_data: str,
    output_dir: str,
    adapter: str | None = None,
    fine_tuned: str | None = None,
    task_data: str | None = None,
    benign_data: str | None = None,
    target_modules: list[str] | str | None = None,
    gguf_file: str | None = None,
    rank: int = 32,
    per_group: bool = True,
    generate: bool = True,
    limit: int | None = 50,
    sample_seed: int | None = 0,
    task_limit: int = 60,
    benign_limit: int = 30,
    max_new_tokens: int = 32,
    task_max_new_tokens: int = 8,
    task_mode: Literal["label", "numeric"] = "label",
    labels: list[str] | None = None,
    judge: str = "keyword",
    case_sensitive: bool = True,
    batch_size: int = 8,
    max_length: int = 256,
    answer_tokens: int | None = 32,
    template: str | None = None,
    system_prompt: str | None = None,
    prompt_column: str = "prompt",
    refusal_column: str = "refusal",
    compliance_column: str = "compliance",
    benign_prompt_column: str = "prompt",
    task_prompt_column: str = "instruction",
    task_input_column: str | None = "input",
    task_response_column: str = "output",
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
    device: str | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Update attribution: which part of a fine-tune's update carried the harm, and which the task.

    Per updated module, dW (scaling * B A of a LoRA adapter, or W_fine_tuned - W_model of a full fine-tune) is split
    into three mutually orthogonal parts that sum to dW: along V (<dW, V> V / ||V||^2), the rest inside V's top-k
    subspace (matrices U_k X, plus V itself), and the part orthogonal to that subspace; modules the direction file
    does not cover form a fourth part, "uncovered". Each part alone, and the update minus each part, is added to
    --model, over all modules and (--per_group) per module group (attention q / k / v / o, MLP), and the refusal
    margin, harmful loss, HS, FA and the benign refusal rate are measured. Weights are changed in memory and restored
    bit for bit; the inputs are never written. Writes basin_attribution.json / .png / .md and prints a verdict.

    Example::

        asft basin attribute --model world/aligned --adapter runs/sft/adapter \\
            --direction world/direction.safetensors --harmful_data world/harmful_eval.jsonl \\
            --task_data world/task_test.jsonl --output_dir runs/sft/basin

    Args:
        model: The aligned model (the adapter's base, or the reference of a full fine-tune).
        direction: Direction file of `asft direction` for this model, storing V (no --rank / --energy).
        harmful_data: Harmful prompts with a fixed refusal and a compliant answer per row (the world's
            harmful_eval.jsonl): margin, harmful loss and HS.
        output_dir: Where the JSON, PNG and Markdown files go.
        adapter: A PEFT LoRA adapter of --model (on any modules).
        fine_tuned: Instead of --adapter: a full fine-tune of --model (Hugging Face directory).
        task_data: Task test examples (instruction / input / output) for FA.
        benign_data: Benign prompts for the benign refusal rate.
        target_modules: Full fine-tune: the modules whose update is attributed (PEFT semantics; default: every
            linear layer except lm_head that changed).
        gguf_file: GGUF file inside --model when it is a directory.
        rank: k, the number of top left singular vectors of V that span V's subspace.
        per_group: Also measure each module group's parts.
        generate: Measure HS, FA and benign refusal (generation); false: margin and harmful loss only.
        limit: Rows of --harmful_data (margin and HS).
        sample_seed: Rows of every probe file are a random sample drawn with this seed (the world's files are
            ordered by source and kind); None: the first rows.
        task_limit: Task examples for FA.
        benign_limit: Benign prompts.
        max_new_tokens: New tokens per generation for HS and benign refusal.
        task_max_new_tokens: New tokens per task answer.
        task_mode: label (the first label word in the answer) or numeric.
        labels: Label words (default: the distinct answers of --task_data).
        judge: keyword, a refusal-judge directory, or a judge model directory (as asft evaluate).
        case_sensitive: Keyword judge: match case as GCG does.
        batch_size: Prompt pairs per forward pass (prompts per generation batch).
        max_length: Most tokens per teacher-forced sequence.
        answer_tokens: Score only the first this many tokens of each fixed answer in the margin and the
            harmful loss (the safety benchmark's margin; None: whole answers, 1.4x the time a point on the
            world).
        template: Prompt format string with {prompt} (default: the tokenizer's chat template).
        system_prompt: Optional system message.
        prompt_column: Prompt column of --harmful_data.
        refusal_column: Refusal column of --harmful_data.
        compliance_column: Compliant-answer column of --harmful_data.
        benign_prompt_column: Prompt column of --benign_data.
        task_prompt_column: Instruction column of --task_data.
        task_input_column: Input column of --task_data.
        task_response_column: Answer column of --task_data.
        dtype: Model dtype.
        device: Torch device (default: cuda if available, else cpu).
        threads: Torch CPU threads.
        progress: Show a progress bar.
    """
    a = SimpleNamespace(**locals())  # the arguments, for the checks and loading both commands share
    clock = time.perf_counter()
    problems: list[str] = []
    _positive(problems, rank=rank, limit=limit, answer_tokens=answer_tokens, task_limit=task_limit,
              benign_limit=benign_limit, max_new_tokens=max_new_tokens,
              task_max_new_tokens=task_max_new_tokens, batch_size=batch_size, threads=threads)  # fmt: skip
    if (adapter is None) == (fine_tuned is None):
        problems.append("give exactly one of --adapter (a LoRA fine-tune) and --fine_tuned (a full fine-tune)")
    if target_modules is not None and adapter is not None:
        problems.append("--target_modules is for --fine_tuned; an adapter's modules are its own")
    if problems:
        raise ArgumentError("; ".join(problems))
    model_dir, gguf = _model_paths(model, gguf_file)
    if fine_tuned is not None and not Path(fine_tuned).expanduser().exists():
        raise InputNotFoundError(f"--fine_tuned {fine_tuned!r}: no such directory")
    out = _check_output(output_dir, {"model": model_dir, "adapter": adapter, "fine_tuned": fine_tuned})
    setup = _setup(a, model_dir, gguf, hs=generate, benign=generate, task=generate, task_generation=True, seed=0,
                   task_mode=task_mode, labels=labels, task_max_new_tokens=task_max_new_tokens)  # fmt: skip
    directions, pairs, probes, lm, judge_obj = setup.directions, setup.pairs, setup.probes, setup.lm, setup.judge
    hs_prompts, benign, task_samples, labels = setup.hs_prompts, setup.benign, setup.task_samples, setup.labels
    if adapter is not None:
        lm, deltas, notes = _lora_updates(lm, adapter)
        unknown = [n for n in deltas if n not in dict(lm.named_modules())]
        if unknown:
            raise CheckpointError(f"--adapter {adapter!r}: modules {unknown[:3]} are not in --model {model!r}")
    else:
        deltas, notes = _full_updates(lm, fine_tuned, target_modules, model)
    covered = [n for n in deltas if n in directions.modules]
    bases = B.build_bases(directions, rank, covered)
    load_seconds = time.perf_counter() - clock

    results = B.run_attribution(lm, deltas, bases, probes, per_group, generate, progress)
    verdict = B.attribution_verdict(results, rank)
    report = {
        "command": "asft basin attribute",
        "verdict": verdict,
        **results,
        "settings": {
            "model": model, "gguf_file": gguf, "adapter": adapter, "fine_tuned": fine_tuned,
            "adapter_sha256": _sha(str(Path(adapter) / "adapter_model.safetensors")) if adapter else None,
            "update": notes, "updated_modules": len(deltas), "modules_with_direction": len(covered),
            "direction": direction, "direction_target_modules": directions.metadata.get("target_modules"),
            "rank": rank, "per_group": per_group, "generate": generate, "harmful_data": harmful_data,
            "sample_seed": sample_seed, "margin_rows": [p.row for p in pairs],
            "harmful_data_sha256": _sha(harmful_data), "margin_prompts": len(pairs), "hs_prompts": len(hs_prompts),
            "task_data": task_data, "task_examples": len(task_samples), "task_mode": task_mode, "labels": labels,
            "benign_data": benign_data, "benign_prompts": len(benign), "max_new_tokens": max_new_tokens,
            "task_max_new_tokens": task_max_new_tokens,
            "judge": judge_obj.describe() if judge_obj is not None and hasattr(judge_obj, "describe") else judge,
            "batch_size": batch_size, "max_length": max_length, "answer_tokens": answer_tokens,
            "template": template, "system_prompt": system_prompt,
            "dtype": dtype, "device": str(next(lm.parameters()).device), "threads": torch.get_num_threads(),
            "parts": {
                "along": "<dW, V>_F / ||V||_F^2 * V",
                "inside": "Pi(dW) - along, Pi the orthogonal projector onto {U_k X} + span{V}",
                "orth": "dW - along - inside (orthogonal to U_k's columns and to V)",
                "uncovered": "the whole dW of modules without a direction",
            },
        },  # fmt: skip
        "versions": _versions(),
    }
    report["seconds"] = {"load": round(load_seconds, 2), "measure": results["seconds"],
                         "total": round(time.perf_counter() - clock, 2)}  # fmt: skip
    files = _write(out, "basin_attribution", report, B.plot_attribution(report), _attribution_markdown(report))
    print(_attribution_markdown(report, brief=True))
    print(f"wrote {files['json']}, {files['png']}, {files['markdown']}")
    return report


def _attribution_markdown(report: dict[str, Any], brief: bool = False) -> str:
    metrics = [("margin", "margin", 3), ("harmful_loss", "harmful loss", 3), ("harmful_score", "HS", 1),
               ("fine_tune_accuracy", "FA", 1), ("benign_refusal", "benign refusal", 1)]  # fmt: skip
    shown = [m for m in metrics if m[0] in report["aligned"]]
    lines = [] if brief else ["# asft basin attribute", ""]
    stats = report["statistics"]["groups"]
    lines += ["Energy of the update per module group (share of ||dW||^2 in each part):", "",
              "| group | modules | share of the update | along V | inside | orth | uncovered |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for g, s in stats.items():
        lines.append(
            f"| {g} | {s['modules']} | {100 * s['share_of_update']:.1f}% | "
            + " | ".join(f"{100 * s[f'{p}_share']:.1f}%" if f"{p}_share" in s else "" for p in B.PARTS)
            + " |"
        )
    lines += ["", "| configuration | modules | " + " | ".join(m[1] for m in shown) + " |",
              "|---|---|" + "---|" * len(shown)]  # fmt: skip
    lines.append("| aligned (no update) | 0 | " + " | ".join(_num(report["aligned"].get(m[0]), m[2]) for m in shown) + " |")
    for row in report["configs"]:
        name = row["name"] + (f" (= {', '.join(a['name'] for a in row['aliases'])})" if row["aliases"] else "")
        lines.append(f"| {name} | {row['modules']} | " + " | ".join(_num(row.get(m[0]), m[2]) for m in shown) + " |")
    lines += ["", "Verdict: " + report["verdict"]["text"], ""]
    return "\n".join(lines)
