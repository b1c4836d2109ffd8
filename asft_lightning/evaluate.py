"""``asft evaluate``: harmful score (HS) and fine-tune accuracy (FA) of a model, optionally with a PEFT adapter.

Prompts are rendered exactly as in training (:func:`asft_lightning.data.render_prompt`: the tokenizer's chat template
or a format string, same system prompt; task prompts join instruction and input as :class:`AsFTDataModule` does),
then answered by batched greedy decoding (:func:`generate`: left padding, KV cache, no sampling, a fresh
``GenerationConfig`` so that a checkpoint's sampling defaults do not apply). Harmful generations are judged by a
keyword or model judge (:mod:`asft_lightning.metrics`), task generations scored against their reference answers.

Evaluation prompts must be held out: with ``disjoint_from`` (or, for a harmful file of an ``asft prepare-demo``
world, that world's alignment, attack and restoration prompts) a harmful prompt that a training split holds, or a
near-duplicate of one, stops the run before any model is loaded (:mod:`asft_lightning.overlap`).

The function :func:`evaluate` is the recipe; its steps are in :mod:`asft_lightning.evaluate_steps` (checks, data,
model, judging) and :mod:`asft_lightning.evaluate_report` (eval.json, summary.md, writing).

Outputs, each written atomically (temporary file in ``output_dir``, then renamed):

* ``eval.json``: HS, FA, counts and every setting (model, adapter and its SHA-256, data files and their SHA-256,
  judge, generation settings, library versions); HS under every judge asked for (``judges``), per prompt source
  and per category when the harmful file has ``source`` / ``category`` columns; the refusal margin
  (:mod:`asft_lightning.margin`, mean and 95% bootstrap interval) with ``margin=True``; the held-out check
  (``held_out_check``: the files checked and their sizes); byte-identical when run twice with the same inputs;
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

from types import SimpleNamespace
from typing import Literal

import torch

from asft_lightning.adapter_check import AdapterMismatchError, check_adapter
from asft_lightning.data import _load_tokenizer
from asft_lightning.evaluate_report import make_report, write_outputs
from asft_lightning.evaluate_steps import (
    check_arguments,
    check_held_out_prompts,
    encode_inputs,
    harmful_rows,
    judge_harmful,
    judges_to_run,
    load_data,
    load_model,
    locate_inputs,
    release_memory,
    task_rows,
    task_token_cap,
    timed,
)
from asft_lightning.generation import MAX_NEW_TOKENS_LIMIT, generate, stop_token_ids
from asft_lightning.margin import margin_scores

__all__ = ["MAX_NEW_TOKENS_LIMIT", "AdapterMismatchError", "check_adapter", "evaluate", "generate"]


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
    disjoint_from: list[str] | None = None,
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
        disjoint_from: Training, alignment or restoration files (JSONL etc. with a "prompt" field) that the
            evaluated prompts of harmful_data must not overlap, e.g. '[train.jsonl, refusals.jsonl]': a prompt
            found there, or a near-duplicate of one (content-word Jaccard >= 0.6), stops the run before any model
            is loaded, naming the files, the count and examples (eval.json "held_out_check" records what was
            checked). None: when harmful_data lies in an `asft prepare-demo` world (a folder with splits.json and
            world.json), that world's alignment, attack and restoration prompts, else no check; an empty list: no
            check.

    Returns:
        The content of eval.json: harmful_score, fine_tune_accuracy (percent or None), counts, settings,
        versions and outputs.
    """
    args = SimpleNamespace(**locals())  # every argument, for the steps and for the record in eval.json
    # 1. Checks, before anything big is loaded.
    check_arguments(args)
    where = locate_inputs(model, gguf_file, output_dir, adapter)
    judges_asked = judges_to_run(judge, judges, harmful_data)

    # 2. Data (held out from every training split), tokens, model.
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        data = load_data(args)
        held_out = check_held_out_prompts(harmful_data, [p for _, p in data.harmful], disjoint_from)
        torch.manual_seed(seed)
        tokenizer = _load_tokenizer(where.model_dir, where.gguf)
        encoded = encode_inputs(tokenizer, data, args)
        lm, fingerprint, torch_device = load_model(where, model, adapter, dtype, device)
        stop_ids = stop_token_ids(lm, tokenizer)

    # 3. Answers: greedy generation for the harmful and the task prompts; the refusal margin.
    with timed(timings, "generate_harmful"):
        harmful_gen = generate(lm, tokenizer, encoded.harmful, batch_size, max_new_tokens, progress, "harmful prompts",
                               share_prefix=True, drop_finished=True)  # fmt: skip
    with timed(timings, "generate_task"):
        task_gen = generate(lm, tokenizer, encoded.task, batch_size, task_token_cap(args), progress, "task prompts",
                            share_prefix=True, drop_finished=True)  # fmt: skip
    margins = []
    if data.pairs:
        with timed(timings, "margin"):
            margins = margin_scores(lm, tokenizer, data.pairs, batch_size, progress=progress, encoded=encoded.margin)
    del lm
    release_memory(torch_device)

    # 4. Judge the harmful answers, score the task answers.
    with timed(timings, "judge"):
        judged = judge_harmful(judges_asked, [p for _, p in data.harmful], harmful_gen, args, torch_device)
        rows = harmful_rows(data, harmful_gen, judged, margins) + task_rows(data, task_gen, batch_size)

    # 5. Report and files.
    report = make_report(args, where, data, judges_asked, judged, margins, held_out, fingerprint, stop_ids)
    write_outputs(where.out, report, rows, timings, write_timings, verbose, progress)
    return report
