"""``asft evaluate``: harmful score (HS) and fine-tune accuracy (FA) of a model, optionally with a PEFT adapter.

Prompts are rendered exactly as in training (:func:`asft_lightning.data.render_prompt`: the tokenizer's chat template
or a format string, same system prompt; task prompts join instruction and input as :class:`AsFTDataModule` does),
then answered by batched greedy decoding (:func:`generate`: left padding, KV cache, no sampling, a fresh
``GenerationConfig`` so that a checkpoint's sampling defaults do not apply). Harmful generations are judged by a
keyword or model judge (:mod:`asft_lightning.metrics`), task generations scored against their reference answers.

Outputs, each written atomically (temporary file in ``output_dir``, then renamed):

* ``eval.json``: HS, FA, counts and every setting (model, adapter and its SHA-256, data files and their SHA-256,
  judge, generation settings, library versions); HS under every judge asked for (``judges``), per prompt source
  and per category when the harmful file has ``source`` / ``category`` columns; the refusal margin
  (:mod:`asft_lightning.margin`, mean and 95% bootstrap interval) with ``margin=True``; byte-identical when run
  twice with the same inputs;
* ``generations.jsonl``: one row per prompt: ``source`` (``harmful`` or ``task``), row, prompt, generation and
  verdict; harmful rows also carry ``prompt_source`` / ``category`` (from the file's ``source`` / ``category``
  columns), ``verdicts`` (one per judge, with several judges) and the margin fields;
* ``summary.md``: the same figures as a Markdown table;
* ``timings.json`` (only with ``write_timings=True``, as it differs between runs): seconds per phase.

Cost: prompts are batched by token length (longest first, order restored), their common token prefix (the chat
template's system line, the task's fixed instruction) is computed once and its KV cache shared by every batch
(``generate(share_prefix=True)``), each sequence stops at end-of-turn / eos and leaves the batch, with its KV-cache
rows (``generate(drop_finished=True)``);
harmful and task prompts get their own new-token caps (``max_new_tokens``, ``task_max_new_tokens``: a label answer
needs a few tokens, a judge a few dozen). The margin computes each prompt once for both answers.

Nothing is ever written into the model or adapter directories.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from asft_lightning.checkpoints import CheckpointError, architecture_fingerprint, sha256_file, split_gguf
from asft_lightning.data import _load_table, _load_tokenizer, _samples, _text, encode_prompts, load_prompts
from asft_lightning.errors import ArgumentError, AsftError, DataError, InputNotFoundError
from asft_lightning.fileio import atomic_write_text
from asft_lightning.generation import MAX_NEW_TOKENS_LIMIT, generate, stop_token_ids
from asft_lightning.margin import encode_pairs, load_margin_pairs, margin_scores, summarize_margins
from asft_lightning.metrics import HarmfulScore, KeywordJudge, TaskAccuracy, judge_kind, load_judge

__all__ = ["MAX_NEW_TOKENS_LIMIT", "AdapterMismatchError", "check_adapter", "evaluate", "generate"]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
MAX_DEFAULT_LABELS = 64
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."


class AdapterMismatchError(AsftError, ValueError):
    """An adapter that does not fit the base model (made for another one). The message names both and the module."""


# --------------------------------------------------------------------------------------------------------------
# Adapter checks
# --------------------------------------------------------------------------------------------------------------


def _adapter_files(adapter: str) -> tuple[dict[str, Any], Path]:
    root = Path(adapter).expanduser()
    if not root.is_dir():
        raise InputNotFoundError(
            f"adapter={adapter!r}: no such directory; expected a PEFT adapter directory (save_pretrained output)"
        )
    cfg = root / ADAPTER_CONFIG
    if not cfg.is_file():
        raise CheckpointError(f"adapter={adapter!r}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"adapter={adapter!r}: {cfg} is not valid JSON ({err})") from err
    weights = next((root / w for w in ADAPTER_WEIGHTS if (root / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"adapter={adapter!r}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return config, weights


def _lora_shapes(weights: Path, adapter: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module name in the base model: {"A": shape, "B": shape}}`` from the adapter's weight file."""
    import re

    pattern = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():
                    shapes[key] = tuple(fh.get_slice(key).get_shape())
        else:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
    except Exception as err:
        raise CheckpointError(f"adapter={adapter!r}: cannot read {weights.name} ({err})") from err
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = pattern.match(key)
        if m is None:
            continue
        name = m["module"]
        name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
        modules.setdefault(name, {})[m["which"]] = shape
    return modules


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (``nn.Linear``, GPT-2's ``Conv1D``), else ``None``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (
        hasattr(module, "nf") and weight is not None and weight.ndim == 2
    ):  # transformers Conv1D: weight (in, out)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def check_adapter(adapter: str, base: torch.nn.Module, model_name: str) -> dict[str, Any]:
    """Check that a LoRA adapter fits ``base``: every adapted module exists there with matching shapes.

    Base-model paths in ``adapter_config.json`` differ between machines, so they are not compared; the weights
    are: ``lora_A`` is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)`` of the base ``Linear``.

    Args:
        adapter: the PEFT adapter directory.
        base: the loaded base model (before PEFT wraps it).
        model_name: the base model's path, for messages.

    Returns:
        The adapter config.

    Raises:
        AdapterMismatchError: a module is missing from ``base`` or its shapes differ.
    """
    config, weights = _adapter_files(adapter)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return config  # other PEFT types: PEFT's own loader checks them
    modules = _lora_shapes(weights, adapter)
    if not modules:
        raise CheckpointError(
            f"adapter={adapter!r}: {weights.name} holds no lora_A / lora_B weights; is it a LoRA adapter?"
        )
    named = dict(base.named_modules())
    for name in sorted(modules):
        pair = modules[name]
        if "A" not in pair or "B" not in pair:
            raise CheckpointError(
                f"adapter={adapter!r}: module {name!r} has lora_{'A' if 'A' in pair else 'B'} only"
            )
        if name not in named:
            example = next((n for n in named if n.endswith(name.rsplit(".", 1)[-1])), None)
            hint = f" (the base model has e.g. {example!r})" if example else ""
            raise AdapterMismatchError(
                f"adapter {adapter!r} does not fit model {model_name!r}: the adapter's module {name!r} is not in the "
                f"base model{hint}; was the adapter made for another base model?"
            )
        shape = _linear_shape(named[name])
        a, b = pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise CheckpointError(
                f"adapter={adapter!r}: module {name!r}: lora_A {a} and lora_B {b} do not form a LoRA pair"
            )
        if shape is not None and (a[1], b[0]) != shape:
            raise AdapterMismatchError(
                f"adapter {adapter!r} does not fit model {model_name!r}: module {name!r}: the adapter's lora_A {a} / "
                f"lora_B {b} are for a {a[1]} -> {b[0]} layer, but the base layer is {shape[0]} -> {shape[1]}; "
                "was the adapter made for another base model?"
            )
    return config


# --------------------------------------------------------------------------------------------------------------
# Input loading
# --------------------------------------------------------------------------------------------------------------


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _file_sha256(source: str | None) -> str | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    return sha256_file(path) if path.is_file() else None


def _harmful_prompts(source: str, column: str, limit: int | None) -> list[tuple[int, str]]:
    prompts = load_prompts(source, "harmful_data", column, "harmful_prompt_column", limit=limit)
    return list(enumerate(prompts))


def _harmful_groups(source: str, columns: dict[str, str | None], n: int) -> dict[str, list[str | None]]:
    """``{"prompt_source": [...], "category": [...]}`` for the first ``n`` rows, for the columns the file has."""
    table = _load_table(source, "harmful_data", {}, None)
    present = set(table.column_names)
    sub = table.select(range(min(n, len(table))))
    out = {}
    for key, column in columns.items():
        if column is not None and column in present:
            out[key] = [None if _text(v) is None else _text(v).strip() or None for v in sub[column]]
    return out


def _judge_specs(judge: str, judges: str | Sequence[str] | None) -> list[str]:
    """The judges to run, the first being the primary one (``HS``, ``verdict``)."""
    if judges is None:
        return [judge]
    items = judges.split(",") if isinstance(judges, str) else list(judges)
    specs = [str(j).strip() for j in items if str(j).strip()]
    if not specs:
        raise ArgumentError(f"judges={judges!r} names no judge; expected e.g. 'keyword,/path/to/judge_dir'")
    repeated = sorted({j for j in specs if specs.count(j) > 1})
    if repeated:
        raise ArgumentError(f"judges={judges!r}: {repeated} given more than once")
    return specs


def _judge_labels(specs: Sequence[str]) -> list[str]:
    """Short unique names of the judges: ``keyword``, else the directory name (``#2`` etc. on a clash)."""
    labels: list[str] = []
    for spec in specs:
        base = "keyword" if spec == "keyword" else (Path(spec).expanduser().name or spec)
        label, k = base, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        labels.append(label)
    return labels


def _group_scores(verdicts: Sequence[bool], groups: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """HS per group value: ``{group: {"prompts", "harmful", "harmful_score"}}`` (rows without a value: ``"?"``)."""
    counts: dict[str, list[int]] = {}
    for verdict, group in zip(verdicts, groups, strict=True):
        c = counts.setdefault(group if group is not None else "?", [0, 0])
        c[0] += 1
        c[1] += int(verdict)
    return {
        g: {"prompts": n, "harmful": k, "harmful_score": round(100.0 * k / n, 6)} for g, (n, k) in sorted(counts.items())
    }


def _default_labels(table: Any, column: str, source: str) -> list[str]:
    seen: dict[str, str] = {}
    for value in table[column]:
        text = _text(value)
        if text is not None and text.strip():
            seen.setdefault(text.strip().lower(), text.strip())
    if len(seen) > MAX_DEFAULT_LABELS:
        raise DataError(
            f"task_data={source!r}: column {column!r} has {len(seen)} distinct values, too many for task_mode='label' "
            f"(at most {MAX_DEFAULT_LABELS} without an explicit labels list); pass labels, or task_mode='numeric' "
            "for numeric answers"
        )
    return sorted(seen.values(), key=str.lower)


def _md(text: Any, width: int = 160) -> str:
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= width else s[: width - 1] + "…"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _summary_markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    c, s = report["counts"], report["settings"]
    lines = ["# Evaluation summary", "", "| metric | value | counts |", "|---|---|---|"]
    if report["harmful_score"] is not None or c["harmful_prompts"]:
        lines.append(
            f"| harmful score (HS, lower is better) | {_fmt(report['harmful_score'])} | "
            f"{c['harmful_judged_harmful']} of {c['harmful_prompts']} harmful prompts judged harmful "
            f"({c['harmful_empty_generations']} empty generations) |"
        )
    if report["fine_tune_accuracy"] is not None or c["task_examples"]:
        lines.append(
            f"| fine-tune accuracy (FA, higher is better) | {_fmt(report['fine_tune_accuracy'])} | "
            f"{c['task_correct']} of {c['task_examples']} task examples correct ({c['task_unanswered']} without an "
            "answer) |"
        )
    judges = report.get("judges") or []
    if len(judges) > 1:
        for j in judges:
            lines.append(
                f"| HS under judge `{j['label']}` | {_fmt(j['harmful_score'])} | {j['harmful']} of "
                f"{c['harmful_prompts']} judged harmful |"
            )
    margin = report.get("margin")
    if margin:
        lines.append(
            f"| refusal margin (nats/token, higher is safer) | {margin['mean']:.4f} | 95% interval "
            f"[{margin['ci95'][0]:.4f}, {margin['ci95'][1]:.4f}] over {margin['prompts']} prompts; "
            f"{margin['positive_share']:.1f}% prefer the refusal |"
        )
    for key, title in (("harmful_score_by_source", "source"), ("harmful_score_by_category", "category")):
        groups = report.get(key)
        if groups:
            lines += ["", f"HS per {title} (judge `{judges[0]['label']}`):", "", f"| {title} | prompts | HS |",
                      "|---|---|---|"]
            lines += [f"| {_md(g)} | {v['prompts']} | {_fmt(v['harmful_score'])} |" for g, v in groups.items()]
    judge = s["judge"] or {}
    if judge:
        lines += [
            "",
            f"Judge: `{judge['judge']}`" + (f" ({judge['path']})" if judge.get("path") else "") + ".",
        ]
    if judge.get("judge") == "keyword":
        lines.append(
            "The keyword judge detects refusals (GCG test prefixes and extensions), not harm: a polite refusal "
            "without a listed phrase, an empty or off-topic answer counts as harmful; a compliant answer that "
            "contains a listed phrase (e.g. 'illegal') counts as safe."
        )
    lines += ["", "## Settings", ""]
    for key in (
        "model",
        "gguf_file",
        "adapter",
        "adapter_sha256",
        "harmful_data",
        "task_data",
        "task_mode",
        "labels",
        "limit",
        "task_limit",
        "batch_size",
        "max_new_tokens",
        "task_max_new_tokens",
        "template",
        "system_prompt",
        "dtype",
        "seed",
    ):
        lines.append(f"- {key}: `{_md(s.get(key), 200)}`")
    for source in ("harmful", "task"):
        examples = [r for r in rows if r["source"] == source][:3]
        if examples:
            lines += [
                "",
                f"## First {source} generations",
                "",
                "| row | prompt | generation | verdict |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {r['row']} | {_md(r['prompt'], 80)} | {_md(r['generation'], 120)} | {r['verdict']} |"
                for r in examples
            ]
    return "\n".join(lines) + "\n"


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from asft_lightning import __version__

    return {
        "asft_lightning": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def evaluate(
    model: str,
    output_dir: str,
    harmful_data: str | None = None,
    task_data: str | None = None,
    adapter: str | None = None,
    gguf_file: str | None = None,
    harmful_prompt_column: str = "prompt",
    task_prompt_column: str = "instruction",
    task_input_column: str | None = "input",
    task_response_column: str = "output",
    task_mode: Literal["label", "numeric"] = "label",
    labels: list[str] | None = None,
    limit: int | None = None,
    task_limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    task_max_new_tokens: int | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
    judge: str = "keyword",
    judges: str | list[str] | None = None,
    case_sensitive: bool = True,
    harmful_label: str | None = None,
    judge_input: Literal["pair", "response"] = "pair",
    source_column: str | None = "source",
    category_column: str | None = "category",
    margin: bool = False,
    refusal_column: str = "refusal",
    compliance_column: str = "compliance",
    margin_max_length: int = 512,
    margin_answer_tokens: int | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
    write_timings: bool = False,
) -> dict:
    """Harmful score (HS) and fine-tune accuracy (FA) of a model, optionally with a PEFT adapter.

    Generates greedily for every harmful prompt and every task example (prompts rendered as in training), judges
    the harmful generations and scores the task ones, and writes ``eval.json``, ``generations.jsonl`` and
    ``summary.md`` into ``output_dir``. Deterministic: the same inputs give the same files.

    Example::

        asft evaluate --model runs/base --adapter runs/asft/adapter --harmful_data advbench.jsonl \\
            --task_data test.jsonl --output_dir runs/asft/eval

    Args:
        model: Base causal LM: a local Hugging Face directory, a hub id, or a .gguf file.
        output_dir: Folder for eval.json, generations.jsonl and summary.md (created; must not be inside the
            model or adapter directory).
        harmful_data: Harmful prompts (.json/.jsonl/.csv/.parquet file, folder, or hub dataset id): HS is the
            percentage whose generation the judge finds harmful. None: no HS.
        task_data: Task test data with prompt, optional input and reference-answer columns: FA is the
            percentage answered correctly. None: no FA. At least one of harmful_data and task_data is needed.
        adapter: PEFT adapter directory to apply to the model (checked to fit the model's layers first).
        gguf_file: GGUF file name inside model when model is a directory.
        harmful_prompt_column: Column of harmful_data holding the prompt.
        task_prompt_column: Column of task_data holding the instruction / prompt.
        task_input_column: Optional column of task_data with extra input, appended after a newline when non-empty
            (as in training). None if the data has no such column.
        task_response_column: Column of task_data holding the reference answer.
        task_mode: "label": the first label word found in the generation must be the reference label;
            "numeric": the generation's answer number (after "####", else its last number) must equal the
            reference's (GSM8K style).
        labels: Label words for task_mode="label"; default: the distinct values of task_response_column.
        limit: Evaluate only the first limit rows of each data file (at least 1). None: every row.
        task_limit: Evaluate only the first task_limit rows of task_data instead (at least 1), e.g. to give the
            harmful and the task file different sizes. None: the same as limit.
        batch_size: Prompts per generation batch (at least 1); also pairs per margin forward pass.
        max_new_tokens: Most tokens generated per harmful prompt, in [1, 4096] (and per task example unless
            task_max_new_tokens is given). Generation stops earlier at end-of-turn / eos.
        task_max_new_tokens: Most tokens generated per task example, in [1, 4096]; None: max_new_tokens. A label
            answer needs only a few.
        template: None to render prompts with the tokenizer's chat template; else a Python format string with a
            {prompt} field (and optionally {system}), as in training.
        system_prompt: Optional system message, as in training.
        judge: "keyword" (GCG refusal prefixes) or the path of a judge model directory: a
            *ForSequenceClassification model with an unsafe/harmful label, or a causal-LM judge such as
            Llama-Guard.
        judges: Several judges in one run, comma-separated (e.g. "keyword,/path/to/judge_dir"): HS is reported
            under each (eval.json "judges", a "verdicts" entry per judge in generations.jsonl); the first is the
            primary judge (harmful_score, verdict). None: judge alone.
        case_sensitive: Keyword judge: match the refusal phrases case-sensitively, as the GCG code does.
        harmful_label: Classifier judge: the id2label name meaning harmful (default: the label named
            unsafe/harmful/toxic/flagged).
        judge_input: Classifier judge: classify the (prompt, generation) "pair" or the "response" alone.
        source_column: Column of harmful_data naming each prompt's source (e.g. advbench); when the file has it,
            HS is also reported per source. None: ignore.
        category_column: Column of harmful_data naming each prompt's harm category; HS per category likewise.
        margin: Also compute the refusal margin (asft_lightning.margin): per harmful prompt, the mean per-token
            log-likelihood of the file's refusal minus that of its compliant answer (nats; > 0: prefers refusing),
            teacher-forced, no generation. Needs refusal_column and compliance_column in harmful_data.
        refusal_column: Column of harmful_data with the fixed refusal (margin only).
        compliance_column: Column of harmful_data with the fixed compliant answer (margin only).
        margin_max_length: Most tokens per prompt + answer sequence of the margin (training's truncation policy).
        margin_answer_tokens: Score only the first margin_answer_tokens tokens of each answer (an answer that ends
            within them keeps its eos); None: whole answers. Cheaper, and no eos after a compliant answer that was
            itself cut at a generation limit.
        dtype: Dtype the model (and a model judge) is loaded in.
        device: Torch device, e.g. "cuda:0" or "cpu"; None: CUDA if available, else CPU.
        seed: Seed set before generation (greedy decoding does not sample; recorded for the record).
        progress: Show progress bars on stderr.
        verbose: Print the summary table and the timings to stdout at the end.
        write_timings: Also write timings.json (seconds per phase) into output_dir; off by default because it
            differs between runs while the other files are byte-identical.

    Returns:
        The content of eval.json: harmful_score, fine_tune_accuracy (percent or None), counts, settings,
        versions and outputs.
    """
    # ------------------------------------------------------------------ cheap checks, before loading anything big
    problems = []
    if harmful_data is None and task_data is None:
        problems.append("nothing to evaluate: give harmful_data, task_data or both")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}")
    if task_max_new_tokens is not None and not 1 <= task_max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(
            f"task_max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}] (or None for max_new_tokens), got "
            f"{task_max_new_tokens}"
        )
    if margin and harmful_data is None:
        problems.append("margin=True needs harmful_data with refusal and compliance columns")
    if margin_max_length < 2:
        problems.append(f"margin_max_length must be >= 2, got {margin_max_length}")
    if margin_answer_tokens is not None and margin_answer_tokens < 1:
        problems.append(f"margin_answer_tokens must be >= 1 (or None for whole answers), got {margin_answer_tokens}")
    if limit is not None and limit < 1:
        problems.append(f"limit must be >= 1 (or None for every row), got {limit}")
    if task_limit is not None and task_limit < 1:
        problems.append(f"task_limit must be >= 1 (or None for the same as limit), got {task_limit}")
    if task_mode not in ("label", "numeric"):
        problems.append(f"task_mode must be 'label' or 'numeric', got {task_mode!r}")
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if labels is not None and task_mode != "label":
        problems.append("labels is only used with task_mode='label'")
    if problems:
        raise ArgumentError("evaluate: " + "; ".join(problems))
    model_dir, gguf = split_gguf(model, gguf_file)
    model_path = Path(model_dir).expanduser()
    local_model = model_path.exists()
    if not local_model and (model.startswith(("/", ".", "~")) or model.endswith(".gguf")):
        raise InputNotFoundError(f"model={model!r}: no such file or directory ({model_path.absolute()})")
    if gguf is not None and not (model_path / gguf).is_file():
        raise InputNotFoundError(
            f"model={model!r} gguf_file={gguf!r}: GGUF file not found ({model_path / gguf})"
        )
    out = Path(output_dir).expanduser()
    for name, path in (
        ("model", model_path if local_model else None),
        ("adapter", Path(adapter) if adapter else None),
    ):
        if path is not None and path.is_dir() and _is_within(out, path):
            raise ArgumentError(
                f"output_dir={output_dir!r} is inside the {name} directory {str(path)!r}; choose another"
            )
    adapter_config = None
    adapter_weights = None
    if adapter is not None:
        adapter_config, adapter_weights = _adapter_files(adapter)
        if str(adapter_config.get("peft_type", "LORA")).upper() == "LORA" and not _lora_shapes(
            adapter_weights, adapter
        ):
            raise CheckpointError(f"adapter={adapter!r}: {adapter_weights.name} holds no lora_A / lora_B weights")
    judge_specs = _judge_specs(judge, judges)
    judge_labels = _judge_labels(judge_specs)
    if harmful_data is not None:
        for spec in judge_specs:
            judge_kind(spec)  # a bad judge path fails here, before the model is loaded

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    harmful = _harmful_prompts(harmful_data, harmful_prompt_column, limit) if harmful_data is not None else []
    groups = (
        _harmful_groups(harmful_data, {"prompt_source": source_column, "category": category_column}, len(harmful))
        if harmful
        else {}
    )
    pairs = (
        load_margin_pairs(harmful_data, "harmful_data", harmful_prompt_column, refusal_column, compliance_column, limit)
        if margin
        else []
    )
    task_samples, task_values = [], []
    accuracy = None
    if task_data is not None:
        columns = {
            "task_prompt_column": task_prompt_column,
            "task_input_column": task_input_column,
            "task_response_column": task_response_column,
        }
        table = _load_table(task_data, "task_data", columns, None)
        rows_limit = limit if task_limit is None else task_limit
        n = len(table) if rows_limit is None else min(rows_limit, len(table))
        task_samples = _samples(
            table,
            list(range(n)),
            {"prompt": task_prompt_column, "input": task_input_column, "response": task_response_column},
            "task_data",
            task_data,
            "task",
        )
        if task_mode == "label" and labels is None:
            labels = _default_labels(table, task_response_column, task_data)
        accuracy = TaskAccuracy(task_mode, labels)
        for s in task_samples:
            try:
                task_values.append(accuracy.target_value(s.response))
            except ValueError as err:
                raise DataError(
                    f"task_data={task_data!r}: row {s.row}, column {task_response_column!r}: {err}"
                    + ("; pass labels that cover every answer" if task_mode == "label" else "")
                ) from err

    # ------------------------------------------------------------------ tokenizer, prompts, model
    torch.manual_seed(seed)
    tokenizer = _load_tokenizer(model_dir, gguf)
    harmful_ids = encode_prompts(tokenizer, [p for _, p in harmful], template, system_prompt)
    task_ids = encode_prompts(tokenizer, [s.prompt for s in task_samples], template, system_prompt)
    margin_encoded = (
        encode_pairs(tokenizer, pairs, template, system_prompt, margin_max_length, margin_answer_tokens) if pairs else []
    )

    from transformers import AutoModelForCausalLM

    torch_device = (
        torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as err:
        raise CheckpointError(f"model={model!r}: could not load it as a causal LM: {err}") from err
    fingerprint = architecture_fingerprint(lm.config.to_dict())
    if adapter is not None:
        check_adapter(adapter, lm, model)
        from peft import PeftModel

        try:
            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=False)
        except Exception as err:
            raise CheckpointError(
                f"adapter={adapter!r}: PEFT could not load it onto model {model!r}: {err}"
            ) from err
    lm.to(torch_device).eval()
    stop_ids = stop_token_ids(lm, tokenizer)
    timings["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    harmful_gen = generate(
        lm, tokenizer, harmful_ids, batch_size, max_new_tokens, progress, "harmful prompts", share_prefix=True,
        drop_finished=True,
    )
    timings["generate_harmful"] = time.perf_counter() - clock
    clock = time.perf_counter()
    task_tokens = max_new_tokens if task_max_new_tokens is None else task_max_new_tokens
    task_gen = generate(
        lm, tokenizer, task_ids, batch_size, task_tokens, progress, "task prompts", share_prefix=True, drop_finished=True
    )
    timings["generate_task"] = time.perf_counter() - clock
    margins = []
    if pairs:
        clock = time.perf_counter()
        margins = margin_scores(lm, tokenizer, pairs, batch_size, progress=progress, encoded=margin_encoded)
        timings["margin"] = time.perf_counter() - clock
    del lm
    gc.collect()
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ judge and score
    clock = time.perf_counter()
    rows: list[dict[str, Any]] = []
    hs_metric = None
    judge_settings: dict[str, Any] | None = {"judge": judge_specs[0]} if harmful_data is not None else None
    judged: list[dict[str, Any]] = []
    if harmful:
        prompts = [p for _, p in harmful]
        for spec, label in zip(judge_specs, judge_labels, strict=True):
            judge_obj = load_judge(
                spec,
                case_sensitive=case_sensitive,
                harmful_label=harmful_label,
                input_format=judge_input,
                batch_size=batch_size,
                device=torch_device,
                dtype=DTYPES[dtype],
            )
            metric = HarmfulScore(judge_obj)
            verdicts: list[bool] = []
            details: list[Any] = []
            for start in range(0, len(prompts), batch_size):
                stop = start + batch_size
                metric.update(prompts[start:stop], harmful_gen[start:stop])
                verdicts += metric.last_verdicts
                if isinstance(judge_obj, KeywordJudge):
                    details += [("refusal_phrase", judge_obj.refusal_phrase(g)) for g in harmful_gen[start:stop]]
                else:
                    extra = getattr(judge_obj, "last_outputs", None) or getattr(judge_obj, "last_scores", None)
                    details += [("judge_output", extra[k]) if extra else None for k in range(len(metric.last_verdicts))]
            judged.append(
                {"spec": spec, "label": label, "settings": judge_obj.describe(), "metric": metric,
                 "verdicts": verdicts, "details": details}
            )  # fmt: skip
            del judge_obj
        hs_metric = judged[0]["metric"]
        judge_settings = judged[0]["settings"]
        by_row = {m.row: m for m in margins}
        for i, (row, prompt) in enumerate(harmful):
            verdict = judged[0]["verdicts"][i]
            record: dict[str, Any] = {
                "source": "harmful",
                "row": row,
                "prompt": prompt,
                "generation": harmful_gen[i],
                "verdict": "harmful" if verdict else "safe",
                "harmful": verdict,
            }
            for key, values in groups.items():
                record[key] = values[i]
            if judged[0]["details"][i] is not None:
                record[judged[0]["details"][i][0]] = judged[0]["details"][i][1]
            if len(judged) > 1:
                record["verdicts"] = {j["label"]: j["verdicts"][i] for j in judged}
                for j in judged[1:]:
                    if j["details"][i] is not None:
                        record.setdefault("judge_details", {})[j["label"]] = j["details"][i][1]
            if row in by_row:
                m = by_row[row]
                record.update(margin=round(m.margin, 6), refusal_logprob=round(m.refusal_logprob, 6),
                              compliance_logprob=round(m.compliance_logprob, 6))
            rows.append(record)
    if task_samples:
        for start in range(0, len(task_samples), batch_size):
            stop = start + batch_size
            accuracy.update(task_gen[start:stop], [s.response for s in task_samples[start:stop]])
            for k, (pred, ok) in enumerate(
                zip(accuracy.last_predictions, accuracy.last_correct, strict=True)
            ):
                s = task_samples[start + k]
                rows.append(
                    {
                        "source": "task",
                        "row": s.row,
                        "prompt": s.prompt,
                        "generation": task_gen[start + k],
                        "verdict": "correct" if ok else "incorrect",
                        "correct": ok,
                        "prediction": pred,
                        "target": task_values[start + k],
                    }
                )

    def value(metric: Any) -> float | None:
        if metric is None or int(metric.total) == 0:
            return None
        v = float(metric.compute())
        return None if math.isnan(v) else round(v, 6)

    timings["judge"] = time.perf_counter() - clock
    judges_report = [
        {
            "label": j["label"],
            "spec": j["spec"],
            "settings": j["settings"],
            "harmful_score": value(j["metric"]),
            "harmful": int(j["metric"].harmful),
            **({"by_source": _group_scores(j["verdicts"], groups["prompt_source"])} if "prompt_source" in groups else {}),
            **({"by_category": _group_scores(j["verdicts"], groups["category"])} if "category" in groups else {}),
        }
        for j in judged
    ]
    report: dict[str, Any] = {
        "harmful_score": value(hs_metric),
        "fine_tune_accuracy": value(accuracy) if task_samples else None,
        "judges": judges_report,
        "harmful_score_by_source": judges_report[0].get("by_source") if judges_report else None,
        "harmful_score_by_category": judges_report[0].get("by_category") if judges_report else None,
        "margin": summarize_margins(margins, seed=seed) if margins else None,
        "counts": {
            "harmful_prompts": len(harmful),
            "harmful_judged_harmful": int(hs_metric.harmful) if hs_metric is not None else 0,
            "harmful_empty_generations": int(hs_metric.empty) if hs_metric is not None else 0,
            "task_examples": len(task_samples),
            "task_correct": int(accuracy.correct) if task_samples else 0,
            "task_unanswered": int(accuracy.unanswered) if task_samples else 0,
        },
        "settings": {
            "model": model,
            "gguf_file": gguf,
            "model_architecture": fingerprint,
            "adapter": adapter,
            "adapter_sha256": sha256_file(adapter_weights) if adapter_weights is not None else None,
            "adapter_rank": adapter_config.get("r") if adapter_config else None,
            "adapter_target_modules": adapter_config.get("target_modules") if adapter_config else None,
            "harmful_data": harmful_data,
            "harmful_data_sha256": _file_sha256(harmful_data),
            "harmful_prompt_column": harmful_prompt_column,
            "task_data": task_data,
            "task_data_sha256": _file_sha256(task_data),
            "task_prompt_column": task_prompt_column,
            "task_input_column": task_input_column,
            "task_response_column": task_response_column,
            "task_mode": task_mode,
            "labels": list(accuracy.labels) if accuracy is not None and accuracy.labels else None,
            "limit": limit,
            "task_limit": task_limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "task_max_new_tokens": task_tokens,
            "template": template,
            "system_prompt": system_prompt,
            "judge": judge_settings,
            "judges": judge_specs if harmful_data is not None else None,
            "source_column": source_column,
            "category_column": category_column,
            "margin": (
                {"refusal_column": refusal_column, "compliance_column": compliance_column,
                 "max_length": margin_max_length, "answer_tokens": margin_answer_tokens}
                if margin
                else None
            ),
            "dtype": dtype,
            "seed": seed,
            "generation": {
                "do_sample": False,
                "num_beams": 1,
                "use_cache": True,
                "padding_side": "left",
                "batching": "sorted by prompt length, longest first; input order restored; common prefix cached; "
                "finished sequences dropped from the batch",
                "stop_token_ids": stop_ids,
            },
        },
        "versions": _versions(),
        "outputs": {"eval": "eval.json", "generations": "generations.jsonl", "summary": "summary.md"},
    }

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), out / "generations.jsonl"
    )
    atomic_write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", out / "eval.json")
    summary = _summary_markdown(report, rows)
    atomic_write_text(summary, out / "summary.md")
    timings = {k: round(v, 2) for k, v in timings.items()}
    timings["total"] = round(sum(timings.values()), 2)
    if write_timings:
        atomic_write_text(json.dumps(timings, indent=2) + "\n", out / "timings.json")
    if verbose:
        print(summary.split("\n## Settings", 1)[0].rstrip())
        print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        print(f"wrote {out / 'eval.json'}, {out / 'generations.jsonl'}, {out / 'summary.md'}")
    elif progress:
        print("evaluate: timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), file=sys.stderr)
    return report
