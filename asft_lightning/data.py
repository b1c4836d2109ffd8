"""Task + harmful data mixing for safety-preserving fine-tuning, as a ``LightningDataModule``.

The AsFT paper (arXiv 2506.08473) fine-tunes on ``n`` samples of which a fraction ``p`` are harmful
(prompt, compliant response) pairs, to emulate a poisoned fine-tuning set: ``n_harmful = round(n * p)``,
``n_task = n - n_harmful``. :class:`AsFTDataModule` draws both, without replacement and deterministically
by ``seed``, from local JSON / JSONL / CSV / parquet files (or a hub dataset), renders each prompt with the
tokenizer's chat template (or a format string), and masks the prompt so that the loss is on the response only.

Two pure helpers are usable without Lightning:

* :func:`encode_example` turns one (prompt, response) pair into ``input_ids`` and ``labels``;
* :func:`collate` right-pads a list of encoded examples into a batch of ``LongTensor``.

Tokenisation: ``prompt_ids + response_ids + [eos]``, the prompt rendered by the template and tokenised on its
own (exactly the tokens a model sees at generation time), the response tokenised on its own. ``labels`` are
``-100`` on every prompt token and on padding.

Truncation policy (examples longer than ``max_length``), chosen so that no example loses all its supervision:

1. If the prompt leaves room (``len(prompt) < max_length``), the prompt is kept whole and the response is cut on
   the right; ``eos`` is kept only when it fits after the *whole* response (a cut answer must not teach the
   model to stop mid-answer).
2. Otherwise the response keeps its first ``min(len(response) + 1, max_length // 2)`` tokens (``eos`` counted)
   and the prompt is cut on the *left*, so the generation header next to the response (e.g.
   ``<|im_start|>assistant``) survives; the head of the prompt (system line, start of the instruction) is lost.

Every example keeps at least one supervised token; :class:`AsFTDataModule` warns once per split with the number
of truncated examples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from asft_lightning.errors import ArgumentError, DataError, InputNotFoundError

__all__ = [
    "IGNORE_INDEX",
    "AsFTDataModule",
    "Sample",
    "collate",
    "encode_example",
    "encode_prompts",
    "load_prompts",
    "load_samples",
    "render_prompt",
    "sample_batches",
]

IGNORE_INDEX = -100
"""Label value ignored by ``torch.nn.functional.cross_entropy`` (prompt and padding positions)."""

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Sample:
    """One training or evaluation pair before tokenisation."""

    prompt: str
    """The user message (instruction and input joined), before the template is applied."""
    response: str
    """The target answer."""
    source: str
    """``"task"``, ``"harmful"`` or ``"test"``."""
    row: int
    """Row index in the source file (for tracing a sample back)."""


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, prompt: str, template: str | None = None, system_prompt: str | None = None) -> str:
    """Render the user ``prompt`` into the text the model sees before its answer.

    Args:
        tokenizer: a Hugging Face tokenizer (only used when ``template`` is ``None``).
        prompt: the user message.
        template: ``None`` to use the tokenizer's chat template with a generation prompt; else a Python format
            string with a ``{prompt}`` field and optionally a ``{system}`` field (filled with ``system_prompt``
            or the empty string).
        system_prompt: an optional system message.

    Returns:
        The rendered prompt text.
    """
    if template is not None:
        return template.format(prompt=prompt, system=system_prompt or "")
    if not getattr(tokenizer, "chat_template", None):
        raise ArgumentError(
            f"template=None asks for the tokenizer's chat template, but tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} has none: pass a format string such as "
            "template='### Instruction:\\n{prompt}\\n\\n### Response:\\n'"
        )
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja2 TemplateError, e.g. a template that refuses the system role
        hint = " (does this chat template accept a system message? try system_prompt=None)" if system_prompt else ""
        raise ArgumentError(f"the tokenizer's chat template failed on a prompt{hint}: {err}") from err


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS id if the tokenizer adds one by default (e.g. Llama-2), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    template: str | None = None,
    system_prompt: str | None = None,
    max_length: int = 512,
) -> dict[str, Any]:
    """Tokenise one (prompt, response) pair for causal-LM fine-tuning with the loss on the response only.

    The sequence is ``prompt_ids + response_ids + [eos]``. The prompt is rendered by :func:`render_prompt` and
    tokenised without special tokens (chat templates write their own); with a custom ``template`` the tokenizer's
    BOS is prepended when the tokenizer adds one by default. See the module docstring for the truncation policy.

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        prompt: the user message.
        response: the target answer.
        template: ``None`` for the tokenizer's chat template, else a format string with ``{prompt}``.
        system_prompt: an optional system message.
        max_length: the most tokens kept (at least 2).

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``; ``labels`` equal ``input_ids`` on
        response (and eos) positions and ``-100`` on prompt positions.
    """
    if max_length < 2:
        raise ArgumentError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ArgumentError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token")
    text = render_prompt(tokenizer, prompt, template, system_prompt)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if template is not None:
        bos = _bos_prefix(tokenizer)
        if bos and prompt_ids[:1] != bos:
            prompt_ids = bos + prompt_ids
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    target = response_ids + [eos]
    truncated = len(prompt_ids) + len(target) > max_length
    if truncated:
        if len(prompt_ids) < max_length:
            # Keep the prompt whole, cut the answer on the right; a cut answer gets no eos.
            target = response_ids[: max_length - len(prompt_ids)]
        else:
            # The prompt alone is too long: keep the head of the answer, cut the prompt on the left so the
            # generation header (next to the answer) survives. A prefix shorter than the target has no eos.
            target = target[: min(len(target), max_length // 2)]
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(target)) :]
    return {
        "input_ids": prompt_ids + target,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target,
        "truncated": truncated,
    }


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad encoded examples into a batch.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (equal lengths); other keys are ignored.
        pad_token_id: the id written into padded ``input_ids`` positions.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each a ``(batch, longest)`` ``LongTensor``; padding has
        ``attention_mask == 0`` and ``labels == -100``.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        if len(ex["labels"]) != k:
            raise ValueError(f"example {i}: {k} input_ids but {len(ex['labels'])} labels")
        input_ids[i, :k] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(ex["labels"], dtype=torch.long)
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------------
# Loading and validating tables
# --------------------------------------------------------------------------------------------------------------


def _innermost_message(err: BaseException) -> str:
    """The message of the deepest cause (``datasets`` wraps parse errors in a generic one)."""
    messages = [str(err)]
    seen = {id(err)}
    cause = err.__cause__ or err.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    return next((m for m in reversed(messages) if m.strip()), type(err).__name__)


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hold back ``datasets``' progress bars and log lines while it reads a local file: a parse error comes back as
    this module's one :class:`DataError`, a small file needs no progress bar."""
    from datasets.utils import logging as ds_logging

    bars, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def _load_table(source: str, argument: str, columns: Mapping[str, str | None], cache_dir: str | None) -> Any:
    """Load ``source`` as a ``datasets.Dataset`` and check that it has rows and the named ``columns``.

    Args:
        source: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a local folder of such files, or a hub
            dataset id with an optional ``:split`` suffix (default split ``train``).
        argument: the name of the argument that gave ``source`` (for error messages).
        columns: ``{argument name: column name}`` of the columns that must exist (``None`` entries are skipped).
        cache_dir: where ``datasets`` keeps its Arrow cache (``None``: its default).
    """
    import datasets

    path = Path(source).expanduser()
    split = "train"
    if path.is_file():
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{argument}={source!r}: unsupported file type {path.suffix!r}; expected one of {sorted(_FORMATS)}"
            )
        if path.stat().st_size == 0 or not path.read_bytes()[:65536].strip():
            raise DataError(f"{argument}={source!r}: the file is empty; expected {fmt} rows")
        what = f"{fmt} file"
        load = partial(datasets.load_dataset, fmt, data_files=str(path), split=split, cache_dir=cache_dir)
    elif path.is_dir():
        what = "data folder"
        load = partial(datasets.load_dataset, str(path), split=split, cache_dir=cache_dir)
    elif path.suffix.lower() in _FORMATS or source.startswith(("/", ".", "~")) or os.sep in source[:1]:
        raise InputNotFoundError(f"{argument}={source!r}: file not found ({path.absolute()})")
    else:
        name, _, hub_split = source.partition(":")
        split = hub_split or split
        what = "hub dataset"
        load = partial(datasets.load_dataset, name, split=split, cache_dir=cache_dir)
    try:
        with nullcontext() if what == "hub dataset" else _quiet_datasets():
            table = load()
    except Exception as err:
        message = _innermost_message(err)
        if "corresponds to no data" in message:
            raise DataError(f"{argument}={source!r}: the {what} has no rows (split {split!r})") from err
        if what == "hub dataset":
            raise DataError(
                f"{argument}={source!r} is not a local file and could not be loaded as a hub dataset "
                f"(split {split!r}; you may need access or a network): {message}"
            ) from err
        raise DataError(f"{argument}={source!r}: could not parse the {what}: {message}") from err
    if isinstance(table, datasets.DatasetDict):  # defensive: a split was given, so this should not happen
        raise DataError(f"{argument}={source!r}: expected one split, got {list(table)}")
    if len(table) == 0:
        raise DataError(f"{argument}={source!r}: the {what} has no rows")
    present = list(table.column_names)
    for column_argument, column in columns.items():
        if column is not None and column not in present:
            hint = f" (or {column_argument}=None if the data has no such column)" if column_argument.endswith("input_column") else ""
            raise DataError(
                f"{argument}={source!r}: column {column!r} (set by {column_argument}) not found{hint}; "
                f"columns present: {present}"
            )
    return table


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _samples(
    table: Any,
    indices: Sequence[int],
    columns: Mapping[str, str | None],
    argument: str,
    source: str,
    label: str,
) -> list[Sample]:
    """Extract ``Sample``s for ``indices``; ``columns`` maps ``prompt``/``input``/``response`` to column names."""
    if not indices:
        return []
    sub = table.select(indices)
    values = {role: (list(sub[col]) if col is not None else None) for role, col in columns.items()}
    out = []
    for j, row in enumerate(indices):
        texts = {}
        for role in ("prompt", "response"):
            texts[role] = _text(values[role][j])
            if texts[role] is None:
                raise DataError(
                    f"{argument}={source!r}: row {row} has no value in column {columns[role]!r} (expected a string)"
                )
        prompt = texts["prompt"]
        if values.get("input") is not None:
            extra = _text(values["input"][j])
            if extra and extra.strip():
                prompt = f"{prompt}\n{extra}"
        out.append(Sample(prompt=prompt, response=texts["response"], source=label, row=int(row)))
    return out


def _load_tokenizer(tokenizer: str, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    path = Path(tokenizer).expanduser()
    if not path.exists() and tokenizer.startswith(("/", ".", "~")):
        raise InputNotFoundError(f"tokenizer={tokenizer!r}: no such directory ({path.absolute()})")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except Exception as err:
        raise ArgumentError(
            f"tokenizer={tokenizer!r}" + (f" gguf_file={gguf_file!r}" if gguf_file else "") + f": could not load: {err}"
        ) from err
    if tok.eos_token_id is None:
        raise ArgumentError(f"tokenizer={tokenizer!r} has no eos token; the response must end with one")
    return tok


# --------------------------------------------------------------------------------------------------------------
# The DataModule
# --------------------------------------------------------------------------------------------------------------


class AsFTDataModule(L.LightningDataModule):
    """Task data mixed with a fraction of harmful data, for (safety-preserving) LoRA fine-tuning.

    Draws ``n`` training samples, ``round(n * harmful_ratio)`` of them from ``harmful_data`` and the rest from
    ``task_data``, without replacement and deterministically by ``seed`` (the AsFT paper's setting: n=1000,
    p=0.1). ``val_size`` further task rows, disjoint from the training ones, form the validation set. Prompts
    are rendered by the tokenizer's chat template (or ``template``) and masked out of the loss.

    Batches are dicts of ``LongTensor`` of shape ``(batch, longest)``: ``input_ids`` (right-padded with the
    tokenizer's pad token, or eos if it has none), ``attention_mask`` (1 on real tokens) and ``labels``
    (``-100`` on prompt and padding positions).

    Selection: one ``torch.Generator`` seeded with ``seed`` permutes the task rows (the first ``val_size`` are
    validation, the next ``n_task`` training; so a larger ``n`` gives a superset and the validation set does not
    depend on ``n``), then permutes the harmful rows (the first ``n_harmful`` are used), then shuffles the mixed
    list. The train loader reshuffles every epoch with its own generator seeded by ``seed``.

    Example::

        dm = AsFTDataModule(tokenizer="path/to/model", task_data="task.jsonl",
                            harmful_data="harmful.jsonl", n=1000, harmful_ratio=0.1)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))

    Args:
        tokenizer: Path or hub id of the tokenizer, normally the model directory.
        task_data: Task (fine-tuning) data: a local .json/.jsonl/.csv/.parquet file, a folder of such files, or
            a hub dataset id with an optional ":split" suffix (default split "train").
        harmful_data: Harmful (prompt, harmful response) data in the same forms as task_data; required when
            harmful_ratio > 0.
        n: Total number of training samples (task + harmful). None: every task row not held out for validation,
            plus harmful rows so that their fraction is harmful_ratio.
        harmful_ratio: Fraction p of harmful samples among the n training samples, in [0, 1]:
            n_harmful = round(n * p) (halves round up), n_task = n - n_harmful.
        val_size: Number of held-out task rows used for validation (0 disables validation).
        test_data: Optional test data with the task columns (same forms as task_data); the test loader uses
            every row of it, or the validation set when None.
        seed: Seed of the sample selection, the mixing order and the train loader's shuffling.
        task_prompt_column: Column of the task data holding the instruction / prompt.
        task_input_column: Optional column of the task data holding extra input, appended to the instruction
            after a newline when non-empty (Alpaca style). None if the data has no such column.
        task_response_column: Column of the task data holding the target answer.
        harmful_prompt_column: Column of the harmful data holding the prompt.
        harmful_response_column: Column of the harmful data holding the (harmful) response.
        template: None to render prompts with the tokenizer's chat template (with the generation prompt);
            else a Python format string with a {prompt} field and optionally a {system} field.
        system_prompt: Optional system message (a system turn for chat templates, the {system} field otherwise).
        max_length: Most tokens per example, at least 2. Longer examples are truncated: the response is cut on
            the right (no eos then); a prompt that alone fills max_length is cut on the left, keeping the first
            min(len(response) + 1, max_length // 2) response tokens.
        batch_size: Examples per batch (per device), at least 1.
        num_workers: DataLoader worker processes (0: load in the main process).
        gguf_file: Name of a GGUF file in the tokenizer directory to read the tokenizer from.
        cache_dir: Folder for the Hugging Face datasets cache (None: the datasets default, HF_DATASETS_CACHE).
    """

    def __init__(
        self,
        tokenizer: str,
        task_data: str,
        harmful_data: str | None = None,
        n: int | None = 1000,
        harmful_ratio: float = 0.1,
        val_size: int = 100,
        test_data: str | None = None,
        seed: int = 42,
        task_prompt_column: str = "instruction",
        task_input_column: str | None = "input",
        task_response_column: str = "output",
        harmful_prompt_column: str = "prompt",
        harmful_response_column: str = "response",
        template: str | None = None,
        system_prompt: str | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        gguf_file: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if not tokenizer:
            problems.append("tokenizer must name a tokenizer directory or hub id")
        if not task_data:
            problems.append("task_data must name a file, folder or hub dataset")
        if n is not None and n < 1:
            problems.append(f"n must be >= 1 or None (all task rows), got {n}")
        if not 0.0 <= harmful_ratio <= 1.0:
            problems.append(f"harmful_ratio must be in [0, 1], got {harmful_ratio}")
        elif harmful_ratio > 0 and not harmful_data:
            problems.append(f"harmful_ratio={harmful_ratio} > 0 needs harmful_data (got None); or set harmful_ratio=0")
        elif n is None and harmful_ratio == 1.0:
            problems.append("n=None sizes the set by the task rows, so harmful_ratio must be < 1; give n explicitly")
        if val_size < 0:
            problems.append(f"val_size must be >= 0, got {val_size}")
        if max_length < 2:
            problems.append(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        for name, value in (
            ("task_prompt_column", task_prompt_column),
            ("task_response_column", task_response_column),
            ("harmful_prompt_column", harmful_prompt_column),
            ("harmful_response_column", harmful_response_column),
        ):
            if not value:
                problems.append(f"{name} must be a column name, got {value!r}")
        if template is not None:
            if "{prompt}" not in template:
                problems.append(f"template must contain a {{prompt}} field, got {template!r}")
            else:
                try:
                    template.format(prompt="", system="")
                except (KeyError, IndexError, ValueError) as err:
                    problems.append(
                        f"template must be a format string with only {{prompt}} and {{system}} fields "
                        f"(double other braces), got {template!r}: {type(err).__name__}: {err}"
                    )
        if problems:
            raise ArgumentError("invalid AsFTDataModule arguments: " + "; ".join(problems))
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.task_data = task_data
        self.harmful_data = harmful_data
        self.n = n
        self.harmful_ratio = harmful_ratio
        self.val_size = val_size
        self.test_data = test_data
        self.seed = seed
        self.task_columns = {"prompt": task_prompt_column, "input": task_input_column, "response": task_response_column}
        self.harmful_columns = {"prompt": harmful_prompt_column, "input": None, "response": harmful_response_column}
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.gguf_file = gguf_file
        self.cache_dir = cache_dir
        # Filled by setup() (per process; nothing global).
        self.tokenizer: Any = None
        self.pad_token_id: int | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.train_dataset: list[dict[str, list[int]]] | None = None
        self.val_dataset: list[dict[str, list[int]]] = []
        self.test_dataset: list[dict[str, list[int]]] = []

    # ---------------------------------------------------------------- counts and tables

    def sample_counts(self, task_rows: int) -> tuple[int, int]:
        """``(n_task, n_harmful)`` for a task table of ``task_rows`` rows (before checking availability)."""
        if self.n is not None:
            n_harmful = math.floor(self.n * self.harmful_ratio + 0.5)
            return self.n - n_harmful, n_harmful
        n_task = task_rows - self.val_size
        if self.harmful_ratio == 0:
            return n_task, 0
        return n_task, math.floor(n_task * self.harmful_ratio / (1.0 - self.harmful_ratio) + 0.5)

    def _column_arguments(self, prefix: str, columns: Mapping[str, str | None]) -> dict[str, str | None]:
        return {f"{prefix}_{role}_column": col for role, col in columns.items()}

    def _load_tables(self) -> tuple[Any, Any, Any]:
        """Load and validate every table (cheap); returns ``(task, harmful or None, test or None)``."""
        task = _load_table(self.task_data, "task_data", self._column_arguments("task", self.task_columns), self.cache_dir)
        harmful = None
        if self.harmful_data:
            harmful = _load_table(
                self.harmful_data,
                "harmful_data",
                self._column_arguments("harmful", self.harmful_columns),
                self.cache_dir,
            )
        test = None
        if self.test_data:
            test = _load_table(self.test_data, "test_data", self._column_arguments("task", self.task_columns), self.cache_dir)
        n_task, n_harmful = self.sample_counts(len(task))
        n_harm_rows = len(harmful) if harmful is not None else 0
        if n_task > len(task) or n_harmful > n_harm_rows:
            raise DataError(
                f"n={self.n} with harmful_ratio={self.harmful_ratio} needs {n_task} task rows and {n_harmful} "
                f"harmful rows, but task_data={self.task_data!r} has {len(task)} rows and "
                f"harmful_data={self.harmful_data!r} has {n_harm_rows} rows"
            )
        if n_task + self.val_size > len(task) or n_task < 0:
            left = len(task) - max(n_task, 0)
            raise DataError(
                f"val_size={self.val_size} is larger than the {left} task rows left after drawing n_task="
                f"{max(n_task, 0)} training rows from task_data={self.task_data!r} ({len(task)} rows)"
            )
        if n_task + n_harmful == 0:
            raise DataError(f"no training samples: task_data={self.task_data!r} has {len(task)} rows, val_size={self.val_size}")
        return task, harmful, test

    # ---------------------------------------------------------------- Lightning hooks

    def prepare_data(self) -> None:
        """Once per node: download / cache and validate the data and the tokenizer (no state is kept)."""
        self._load_tables()
        _load_tokenizer(self.tokenizer_path, self.gguf_file)

    def setup(self, stage: str | None = None) -> None:
        """Per process: select, mix and tokenise the samples (idempotent; the same on every rank)."""
        if self.train_dataset is not None:
            return
        task, harmful, test = self._load_tables()
        n_task, n_harmful = self.sample_counts(len(task))
        gen = torch.Generator().manual_seed(self.seed)
        task_order = torch.randperm(len(task), generator=gen).tolist()
        val_rows = task_order[: self.val_size]
        train_rows = task_order[self.val_size : self.val_size + n_task]
        harm_rows = torch.randperm(len(harmful), generator=gen).tolist()[:n_harmful] if harmful is not None else []
        mixed = _samples(task, train_rows, self.task_columns, "task_data", self.task_data, "task")
        mixed += _samples(harmful, harm_rows, self.harmful_columns, "harmful_data", self.harmful_data or "", "harmful")
        order = torch.randperm(len(mixed), generator=gen).tolist()
        self.train_samples = [mixed[i] for i in order]
        self.val_samples = _samples(task, val_rows, self.task_columns, "task_data", self.task_data, "task")
        if test is not None:
            self.test_samples = _samples(test, range(len(test)), self.task_columns, "test_data", self.test_data, "test")
        else:
            self.test_samples = list(self.val_samples)
        self.load_tokenizer()
        self.val_dataset = self._encode(self.val_samples, "validation")
        self.test_dataset = self._encode(self.test_samples, "test")
        self.train_dataset = self._encode(self.train_samples, "training")

    def load_tokenizer(self) -> Any:
        """Load (once) and return the tokenizer; sets ``pad_token_id`` (the pad token, else eos)."""
        if self.tokenizer is None:
            self.tokenizer = _load_tokenizer(self.tokenizer_path, self.gguf_file)
            pad = self.tokenizer.pad_token_id
            self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        return self.tokenizer

    def format_prompt(self, prompt: str) -> str:
        """The text a model is given for ``prompt`` (same template and system prompt as in training)."""
        return render_prompt(self.load_tokenizer(), prompt, self.template, self.system_prompt)

    def _encode(self, samples: Sequence[Sample], split: str) -> list[dict[str, list[int]]]:
        out, truncated = [], 0
        for s in samples:
            ex = encode_example(self.tokenizer, s.prompt, s.response, self.template, self.system_prompt, self.max_length)
            truncated += ex.pop("truncated")
            out.append(ex)
        if truncated:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"{truncated} of {len(samples)} {split} examples are longer than max_length={self.max_length} "
                "and were truncated (response cut on the right; over-long prompts cut on the left)"
            )
        return out

    # ---------------------------------------------------------------- loaders

    def _loader(self, dataset: Sequence[Mapping[str, Any]], shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,  # type: ignore[arg-type]  # a list of dicts is a map-style dataset
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError("AsFTDataModule.setup() must run before its dataloaders are requested")

    def train_dataloader(self) -> DataLoader:
        """The mixed task + harmful samples, reshuffled every epoch by a generator seeded with ``seed``."""
        self._require_setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out task rows in file-independent seeded order (an empty list when ``val_size=0``)."""
        self._require_setup()
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset else []

    def test_dataloader(self) -> DataLoader | list:
        """Every row of ``test_data``, or the validation set when no ``test_data`` was given."""
        self._require_setup()
        return self._loader(self.test_dataset, shuffle=False) if self.test_dataset else []


def load_samples(
    source: str,
    argument: str,
    prompt_column: str,
    response_column: str,
    input_column: str | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[Sample]:
    """Read (prompt, response) pairs from a data file or hub dataset, validated as the data module does.

    Args:
        source: a local JSON / JSONL / CSV / parquet file or folder, or a hub dataset id (``id:split``).
        argument: the name of the argument that gave ``source`` (used in error messages).
        prompt_column: column with the prompt (or instruction).
        response_column: column with the response.
        input_column: optional column joined to the prompt with a newline when non-empty.
        limit: keep the first ``limit`` rows (``None``: all).
        cache_dir: ``datasets`` cache folder.
    """
    columns = {"prompt": prompt_column, "input": input_column, "response": response_column}
    arg_columns = {f"{argument}_{role}_column": col for role, col in columns.items()}
    table = _load_table(source, argument, arg_columns, cache_dir)
    rows = range(len(table) if limit is None else min(limit, len(table)))
    return _samples(table, rows, columns, argument, source, argument)


def load_prompts(
    source: str,
    argument: str,
    prompt_column: str,
    column_argument: str = "prompt_column",
    limit: int | None = None,
    cache_dir: str | None = None,
) -> list[str]:
    """Read prompts alone (no responses), e.g. harmful probe prompts, validated as the data module does.

    Args:
        source: a local JSON / JSONL / CSV / parquet file or folder, or a hub dataset id (``id:split``).
        argument: the name of the argument that gave ``source`` (used in error messages).
        prompt_column: column with the prompt.
        column_argument: the name of the argument that gave ``prompt_column`` (used in error messages).
        limit: keep the first ``limit`` rows (``None``: all).
        cache_dir: ``datasets`` cache folder.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: an empty or unparsable file, a missing column, or a row without text in ``prompt_column``.
    """
    table = _load_table(source, argument, {column_argument: prompt_column}, cache_dir)
    n = len(table) if limit is None else min(limit, len(table))
    out = []
    for row, value in enumerate(table.select(range(n))[prompt_column]):
        text = _text(value)
        if text is None or not text.strip():
            raise DataError(
                f"{argument}={source!r}: row {row} has no text in column {prompt_column!r} (expected a string)"
            )
        out.append(text)
    return out


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], template: str | None = None, system_prompt: str | None = None
) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before its answer in training, ready for generation.

    Rendered by :func:`render_prompt` and tokenised without special tokens; with a custom ``template`` the
    tokenizer's BOS is prepended when it adds one by default (as :func:`encode_example` does).
    """
    bos = _bos_prefix(tokenizer) if template is not None else []
    out = []
    for prompt in prompts:
        ids = tokenizer(render_prompt(tokenizer, prompt, template, system_prompt), add_special_tokens=False)["input_ids"]
        out.append(bos + ids if bos and ids[:1] != bos else ids)
    return out


def sample_batches(
    tokenizer: Any,
    samples: Sequence[Sample],
    batch_size: int = 8,
    max_length: int = 512,
    template: str | None = None,
    system_prompt: str | None = None,
) -> list[dict[str, Tensor]]:
    """Tokenise ``samples`` exactly as in training (loss on responses only) and collate fixed batches, in order."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for s in samples:
        ex = encode_example(tokenizer, s.prompt, s.response, template, system_prompt, max_length)
        ex.pop("truncated")
        encoded.append(ex)
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
