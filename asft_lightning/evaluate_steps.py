"""The steps of ``asft evaluate``, one function each, in the order :func:`asft_lightning.evaluate.evaluate` calls them.

1. check the arguments and inputs, before anything big is loaded (:func:`check_arguments`, :func:`locate_inputs`,
   :func:`judges_to_run`);
2. read the data (:func:`load_data`) and refuse evaluation prompts that a training split holds
   (:func:`check_held_out_prompts`); tokenise (:func:`encode_inputs`); load the model and adapter (:func:`load_model`);
3. generate answers (:func:`asft_lightning.generation.generate`) and the refusal margin (in the recipe);
4. judge the harmful answers under every judge (:func:`judge_harmful`), one output row per prompt
   (:func:`harmful_rows`, :func:`task_rows`, the latter scoring the task answers).

The report and the output files are :mod:`asft_lightning.evaluate_report`'s.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from asft_lightning.adapter_check import adapter_files, check_adapter, lora_shapes
from asft_lightning.checkpoints import CheckpointError, architecture_fingerprint, split_gguf
from asft_lightning.data import _load_table, _samples, _text, encode_prompts, load_prompts
from asft_lightning.errors import ArgumentError, DataError, InputNotFoundError
from asft_lightning.generation import MAX_NEW_TOKENS_LIMIT
from asft_lightning.margin import MarginPair, MarginRecord, encode_pairs, load_margin_pairs
from asft_lightning.metrics import HarmfulScore, KeywordJudge, TaskAccuracy, judge_kind, load_judge
from asft_lightning.overlap import HELD_OUT_THRESHOLD, check_held_out, world_training_splits

__all__ = [
    "DTYPES",
    "EvalData",
    "Judged",
    "Located",
    "check_arguments",
    "check_held_out_prompts",
    "encode_inputs",
        "harmful_rows",
    "judge_harmful",
    "judges_to_run",
    "load_data",
    "load_model",
    "locate_inputs",
    "release_memory",
    "task_rows",
    "task_token_cap",
    "timed",
]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
MAX_DEFAULT_LABELS = 64


@dataclass
class Located:
    """Where the inputs are, checked: the model folder (and GGUF file), the output folder, the adapter's files."""

    model_dir: str
    gguf: str | None
    out: Path
    adapter_config: dict[str, Any] | None
    adapter_weights: Path | None


@dataclass
class EvalData:
    """The rows to evaluate, read and validated."""

    harmful: list[tuple[int, str]]
    """``(row, prompt)`` of every harmful prompt."""
    groups: dict[str, list[str | None]]
    """``{"prompt_source": [...], "category": [...]}`` per harmful prompt, for the columns the file has."""
    pairs: list[MarginPair]
    """The margin's (prompt, refusal, compliant answer) rows (empty without ``margin``)."""
    task_samples: list[Any]
    """The task examples (prompt, response, row)."""
    task_values: list[Any]
    """Each task example's reference answer as the accuracy metric reads it."""
    accuracy: TaskAccuracy | None
    """The task metric (None without task data)."""


@dataclass
class Judged:
    """One judge's verdicts on the harmful generations."""

    spec: str
    label: str
    settings: dict[str, Any]
    metric: HarmfulScore
    verdicts: list[bool]
    details: list[tuple[str, Any] | None]
    """Per prompt: ``(field name, value)`` (the keyword judge's refusal phrase, a model judge's output) or None."""


def task_token_cap(a: SimpleNamespace) -> int:
    """Most new tokens per task answer: ``task_max_new_tokens``, else ``max_new_tokens``."""
    return a.max_new_tokens if a.task_max_new_tokens is None else a.task_max_new_tokens


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes to ``timings[phase]``."""
    clock = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - clock


# --------------------------------------------------------------------------------------------------------------
# 1. Checks, before anything big is loaded
# --------------------------------------------------------------------------------------------------------------


def check_arguments(a: SimpleNamespace) -> None:
    """Every argument out of its range, or combination that cannot work, in one :class:`ArgumentError`."""
    problems = []
    if a.harmful_data is None and a.task_data is None:
        problems.append("nothing to evaluate: give harmful_data, task_data or both")
    if a.batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {a.batch_size}")
    if not 1 <= a.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {a.max_new_tokens}")
    if a.task_max_new_tokens is not None and not 1 <= a.task_max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        problems.append(
            f"task_max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}] (or None for max_new_tokens), got "
            f"{a.task_max_new_tokens}"
        )
    if a.margin and a.harmful_data is None:
        problems.append("margin=True needs harmful_data with refusal and compliance columns")
    if a.margin_max_length < 2:
        problems.append(f"margin_max_length must be >= 2, got {a.margin_max_length}")
    if a.margin_answer_tokens is not None and a.margin_answer_tokens < 1:
        problems.append(
            f"margin_answer_tokens must be >= 1 (or None for whole answers), got {a.margin_answer_tokens}"
        )
    if a.limit is not None and a.limit < 1:
        problems.append(f"limit must be >= 1 (or None for every row), got {a.limit}")
    if a.task_limit is not None and a.task_limit < 1:
        problems.append(f"task_limit must be >= 1 (or None for the same as limit), got {a.task_limit}")
    if a.task_mode not in ("label", "numeric"):
        problems.append(f"task_mode must be 'label' or 'numeric', got {a.task_mode!r}")
    if a.dtype not in DTYPES:
        problems.append(f"dtype must be one of {sorted(DTYPES)}, got {a.dtype!r}")
    if a.labels is not None and a.task_mode != "label":
        problems.append("labels is only used with task_mode='label'")
    if a.disjoint_from and a.harmful_data is None:
        problems.append("disjoint_from checks the prompts of harmful_data: give harmful_data")
    if problems:
        raise ArgumentError("evaluate: " + "; ".join(problems))


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def locate_inputs(model: str, gguf_file: str | None, output_dir: str, adapter: str | None) -> Located:
    """The model (and GGUF file) exist, the output folder is outside the model and adapter, the adapter is readable.

    Raises:
        InputNotFoundError: a local model path or GGUF file that does not exist.
        ArgumentError: ``output_dir`` inside the model or adapter directory.
        CheckpointError: an adapter without a config, weights, or LoRA weights.
    """
    model_dir, gguf = split_gguf(model, gguf_file)
    model_path = Path(model_dir).expanduser()
    local_model = model_path.exists()
    if not local_model and (model.startswith(("/", ".", "~")) or model.endswith(".gguf")):
        raise InputNotFoundError(f"model={model!r}: no such file or directory ({model_path.absolute()})")
    if gguf is not None and not (model_path / gguf).is_file():
        raise InputNotFoundError(f"model={model!r} gguf_file={gguf!r}: GGUF file not found ({model_path / gguf})")
    out = Path(output_dir).expanduser()
    for name, path in (("model", model_path if local_model else None), ("adapter", Path(adapter) if adapter else None)):
        if path is not None and path.is_dir() and _is_within(out, path):
            raise ArgumentError(
                f"output_dir={output_dir!r} is inside the {name} directory {str(path)!r}; choose another"
            )
    config = weights = None
    if adapter is not None:
        config, weights = adapter_files(adapter)
        if str(config.get("peft_type", "LORA")).upper() == "LORA" and not lora_shapes(weights, adapter):
            raise CheckpointError(f"adapter={adapter!r}: {weights.name} holds no lora_A / lora_B weights")
    return Located(model_dir, gguf, out, config, weights)


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


def judges_to_run(judge: str, judges: str | Sequence[str] | None, harmful_data: str | None) -> list[tuple[str, str]]:
    """``(spec, label)`` of every judge, the primary one first; a bad judge path fails here, before the model loads."""
    specs = _judge_specs(judge, judges)
    if harmful_data is not None:
        for spec in specs:
            judge_kind(spec)
    return list(zip(specs, _judge_labels(specs), strict=True))


# --------------------------------------------------------------------------------------------------------------
# 2. Data, held-out check, tokens, model
# --------------------------------------------------------------------------------------------------------------


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


def _task_data(a: SimpleNamespace) -> tuple[list[Any], list[Any], TaskAccuracy | None]:
    """The task examples, their reference answers as the metric reads them, and the metric."""
    if a.task_data is None:
        return [], [], None
    columns = {"prompt": a.task_prompt_column, "input": a.task_input_column, "response": a.task_response_column}
    table = _load_table(a.task_data, "task_data", {f"task_{k}_column": v for k, v in columns.items()}, None)
    rows_limit = a.limit if a.task_limit is None else a.task_limit
    n = len(table) if rows_limit is None else min(rows_limit, len(table))
    samples = _samples(table, list(range(n)), columns, "task_data", a.task_data, "task")
    labels = a.labels
    if a.task_mode == "label" and labels is None:
        labels = _default_labels(table, a.task_response_column, a.task_data)
    accuracy = TaskAccuracy(a.task_mode, labels)
    values = []
    for s in samples:
        try:
            values.append(accuracy.target_value(s.response))
        except ValueError as err:
            raise DataError(
                f"task_data={a.task_data!r}: row {s.row}, column {a.task_response_column!r}: {err}"
                + ("; pass labels that cover every answer" if a.task_mode == "label" else "")
            ) from err
    return samples, values, accuracy


def load_data(a: SimpleNamespace) -> EvalData:
    """Read and validate the harmful prompts (with their source / category and margin answers) and the task rows."""
    harmful = []
    if a.harmful_data is not None:
        prompts = load_prompts(a.harmful_data, "harmful_data", a.harmful_prompt_column, "harmful_prompt_column",
                               limit=a.limit)  # fmt: skip
        harmful = list(enumerate(prompts))
    groups = (
        _harmful_groups(a.harmful_data, {"prompt_source": a.source_column, "category": a.category_column}, len(harmful))
        if harmful
        else {}
    )
    pairs = (
        load_margin_pairs(a.harmful_data, "harmful_data", a.harmful_prompt_column, a.refusal_column,
                          a.compliance_column, a.limit)  # fmt: skip
        if a.margin
        else []
    )
    samples, values, accuracy = _task_data(a)
    return EvalData(harmful, groups, pairs, samples, values, accuracy)


def check_held_out_prompts(
    harmful_data: str | None, prompts: Sequence[str], disjoint_from: Sequence[str] | None
) -> dict[str, Any] | None:
    """Refuse harmful prompts that a training, alignment or restoration split holds (or paraphrases).

    The splits are the files of ``disjoint_from`` (their ``prompt`` field); with ``disjoint_from=None``, the
    training splits of the ``asft prepare-demo`` world that ``harmful_data`` lies in
    (:func:`asft_lightning.overlap.world_training_splits`), if it lies in one.

    Returns:
        The record for eval.json: ``{"prompts", "threshold", "source", "splits": {file: its prompts}}``; None when
        nothing was checked.

    Raises:
        DataError: from :func:`asft_lightning.overlap.check_held_out`: the count per split and examples.
    """
    if harmful_data is None:
        return None
    source = "disjoint_from" if disjoint_from is not None else "world"
    files = list(dict.fromkeys(disjoint_from)) if disjoint_from is not None else world_training_splits(harmful_data)
    if not files:
        return None
    argument = "disjoint_from" if source == "disjoint_from" else "world split"
    splits = {f: load_prompts(f, argument, "prompt", f"{argument}'s prompt field") for f in files}
    try:
        check_held_out(prompts, splits, eval_name=f"harmful_data={harmful_data!r}", threshold=HELD_OUT_THRESHOLD)
    except DataError as err:
        if source == "world":
            raise DataError(f"{err} (checked against the prepare-demo world's training splits because harmful_data "
                            "lies in that world; disjoint_from=[] skips the check)") from err  # fmt: skip
        raise
    return {"prompts": len(prompts), "threshold": HELD_OUT_THRESHOLD, "source": source,
            "splits": {f: len(p) for f, p in splits.items()}}  # fmt: skip


@dataclass
class Encoded:
    """Token ids of every prompt, as the model saw them in training."""

    harmful: list[list[int]]
    task: list[list[int]]
    margin: list[Any]


def encode_inputs(tokenizer: Any, data: EvalData, a: SimpleNamespace) -> Encoded:
    """Render and tokenise the harmful prompts, task prompts and margin pairs (chat template or format string)."""
    harmful = encode_prompts(tokenizer, [p for _, p in data.harmful], a.template, a.system_prompt)
    task = encode_prompts(tokenizer, [s.prompt for s in data.task_samples], a.template, a.system_prompt)
    margin = (
        encode_pairs(tokenizer, data.pairs, a.template, a.system_prompt, a.margin_max_length, a.margin_answer_tokens)
        if data.pairs
        else []
    )
    return Encoded(harmful, task, margin)


def load_model(
    where: Located, model: str, adapter: str | None, dtype: str, device: str | None
) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """The causal LM (with the adapter, checked to fit first) in eval mode on ``device``; its architecture
    fingerprint; the device."""
    from transformers import AutoModelForCausalLM

    torch_device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if where.gguf is not None:
        kwargs["gguf_file"] = where.gguf
    try:
        lm = AutoModelForCausalLM.from_pretrained(where.model_dir, **kwargs)
    except Exception as err:
        raise CheckpointError(f"model={model!r}: could not load it as a causal LM: {err}") from err
    fingerprint = architecture_fingerprint(lm.config.to_dict())
    if adapter is not None:
        check_adapter(adapter, lm, model)
        from peft import PeftModel

        try:
            lm = PeftModel.from_pretrained(lm, adapter, is_trainable=False)
        except Exception as err:
            raise CheckpointError(f"adapter={adapter!r}: PEFT could not load it onto model {model!r}: {err}") from err
    lm.to(torch_device).eval()
    return lm, fingerprint, torch_device


def release_memory(device: torch.device) -> None:
    """Return the memory of the model the caller has just deleted, before the judges load."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# 4. Judge and score
# --------------------------------------------------------------------------------------------------------------


def judge_harmful(
    judges: Sequence[tuple[str, str]], prompts: Sequence[str], generations: Sequence[str], a: SimpleNamespace,
    device: torch.device,
) -> list[Judged]:
    """Each judge's verdicts on the harmful generations (judged in batches of ``batch_size``), one judge at a time."""
    judged: list[Judged] = []
    if not prompts:
        return judged
    for spec, label in judges:
        judge = load_judge(spec, case_sensitive=a.case_sensitive, harmful_label=a.harmful_label,
                           input_format=a.judge_input, batch_size=a.batch_size, device=device,
                           dtype=DTYPES[a.dtype])  # fmt: skip
        metric = HarmfulScore(judge)
        verdicts: list[bool] = []
        details: list[Any] = []
        for start in range(0, len(prompts), a.batch_size):
            stop = start + a.batch_size
            metric.update(prompts[start:stop], generations[start:stop])
            verdicts += metric.last_verdicts
            if isinstance(judge, KeywordJudge):
                details += [("refusal_phrase", judge.refusal_phrase(g)) for g in generations[start:stop]]
            else:
                extra = getattr(judge, "last_outputs", None) or getattr(judge, "last_scores", None)
                details += [("judge_output", extra[k]) if extra else None for k in range(len(metric.last_verdicts))]
        judged.append(Judged(spec, label, judge.describe(), metric, verdicts, details))
        del judge
    return judged


def harmful_rows(
    data: EvalData, generations: Sequence[str], judged: Sequence[Judged], margins: Sequence[MarginRecord]
) -> list[dict[str, Any]]:
    """One generations.jsonl row per harmful prompt: the primary verdict, every judge's, the margin fields."""
    by_row = {m.row: m for m in margins}
    rows = []
    for i, (row, prompt) in enumerate(data.harmful):
        verdict = judged[0].verdicts[i]
        record: dict[str, Any] = {"source": "harmful", "row": row, "prompt": prompt, "generation": generations[i],
                                  "verdict": "harmful" if verdict else "safe", "harmful": verdict}  # fmt: skip
        for key, values in data.groups.items():
            record[key] = values[i]
        if judged[0].details[i] is not None:
            record[judged[0].details[i][0]] = judged[0].details[i][1]
        if len(judged) > 1:
            record["verdicts"] = {j.label: j.verdicts[i] for j in judged}
            for j in judged[1:]:
                if j.details[i] is not None:
                    record.setdefault("judge_details", {})[j.label] = j.details[i][1]
        if row in by_row:
            m = by_row[row]
            record.update(margin=round(m.margin, 6), refusal_logprob=round(m.refusal_logprob, 6),
                          compliance_logprob=round(m.compliance_logprob, 6))  # fmt: skip
        rows.append(record)
    return rows


def task_rows(data: EvalData, generations: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
    """Score the task generations (``data.accuracy`` is updated) and one generations.jsonl row per example."""
    rows = []
    samples, accuracy = data.task_samples, data.accuracy
    for start in range(0, len(samples), batch_size):
        stop = start + batch_size
        accuracy.update(generations[start:stop], [s.response for s in samples[start:stop]])
        for k, (pred, ok) in enumerate(zip(accuracy.last_predictions, accuracy.last_correct, strict=True)):
            s = samples[start + k]
            rows.append({"source": "task", "row": s.row, "prompt": s.prompt, "generation": generations[start + k],
                         "verdict": "correct" if ok else "incorrect", "correct": ok, "prediction": pred,
                         "target": data.task_values[start + k]})  # fmt: skip
    return rows
