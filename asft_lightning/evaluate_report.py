"""What ``asft evaluate`` reports and writes: the eval.json record, summary.md, and the files themselves.

:func:`make_report` assembles eval.json (figures per judge, per prompt source and category, the margin, counts,
every setting and library version); :func:`summary_markdown` renders it as a table; :func:`write_outputs` writes
generations.jsonl, eval.json, summary.md (and timings.json on request), each atomically.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from asft_lightning.checkpoints import sha256_file
from asft_lightning.evaluate_steps import EvalData, Judged, Located, task_token_cap
from asft_lightning.fileio import atomic_write_text
from asft_lightning.margin import MarginRecord, summarize_margins

__all__ = ["judges_report", "make_report", "summary_markdown", "write_outputs"]


def _value(metric: Any) -> float | None:
    """A metric's value, rounded; None when it saw nothing (or is NaN)."""
    if metric is None or int(metric.total) == 0:
        return None
    v = float(metric.compute())
    return None if math.isnan(v) else round(v, 6)


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


def judges_report(judged: Sequence[Judged], groups: dict[str, list[str | None]]) -> list[dict[str, Any]]:
    """eval.json's ``judges``: HS under each judge, per prompt source and per category where the file has them."""
    return [
        {
            "label": j.label,
            "spec": j.spec,
            "settings": j.settings,
            "harmful_score": _value(j.metric),
            "harmful": int(j.metric.harmful),
            **({"by_source": _group_scores(j.verdicts, groups["prompt_source"])} if "prompt_source" in groups else {}),
            **({"by_category": _group_scores(j.verdicts, groups["category"])} if "category" in groups else {}),
        }
        for j in judged
    ]


def _file_sha256(source: str | None) -> str | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    return sha256_file(path) if path.is_file() else None


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


def make_report(
    a: SimpleNamespace,
    where: Located,
    data: EvalData,
    judges: Sequence[tuple[str, str]],
    judged: Sequence[Judged],
    margins: Sequence[MarginRecord],
    held_out: dict[str, Any] | None,
    fingerprint: dict[str, Any],
    stop_ids: list[int],
) -> dict[str, Any]:
    """The content of eval.json: HS, FA, the margin, counts, every setting (``a``: evaluate's arguments), versions.

    ``judges``: ``(spec, label)`` of every judge asked for; ``judged``: their verdicts (none without harmful prompts).
    """
    hs = judged[0].metric if judged else None
    accuracy = data.accuracy if data.task_samples else None
    per_judge = judges_report(judged, data.groups)
    config = where.adapter_config
    if judged:
        judge_settings: dict[str, Any] | None = judged[0].settings
    else:
        judge_settings = {"judge": judges[0][0]} if a.harmful_data is not None else None
    return {
        "harmful_score": _value(hs),
        "fine_tune_accuracy": _value(accuracy) if accuracy is not None else None,
        "judges": per_judge,
        "harmful_score_by_source": per_judge[0].get("by_source") if per_judge else None,
        "harmful_score_by_category": per_judge[0].get("by_category") if per_judge else None,
        "margin": summarize_margins(margins, seed=a.seed) if margins else None,
        "held_out_check": held_out,
        "counts": {
            "harmful_prompts": len(data.harmful),
            "harmful_judged_harmful": int(hs.harmful) if hs is not None else 0,
            "harmful_empty_generations": int(hs.empty) if hs is not None else 0,
            "task_examples": len(data.task_samples),
            "task_correct": int(accuracy.correct) if accuracy is not None else 0,
            "task_unanswered": int(accuracy.unanswered) if accuracy is not None else 0,
        },
        "settings": {
            "model": a.model,
            "gguf_file": where.gguf,
            "model_architecture": fingerprint,
            "adapter": a.adapter,
            "adapter_sha256": sha256_file(where.adapter_weights) if where.adapter_weights is not None else None,
            "adapter_rank": config.get("r") if config else None,
            "adapter_target_modules": config.get("target_modules") if config else None,
            "harmful_data": a.harmful_data,
            "harmful_data_sha256": _file_sha256(a.harmful_data),
            "harmful_prompt_column": a.harmful_prompt_column,
            "task_data": a.task_data,
            "task_data_sha256": _file_sha256(a.task_data),
            "task_prompt_column": a.task_prompt_column,
            "task_input_column": a.task_input_column,
            "task_response_column": a.task_response_column,
            "task_mode": a.task_mode,
            "labels": list(data.accuracy.labels) if data.accuracy is not None and data.accuracy.labels else None,
            "limit": a.limit,
            "task_limit": a.task_limit,
            "batch_size": a.batch_size,
            "max_new_tokens": a.max_new_tokens,
            "task_max_new_tokens": task_token_cap(a),
            "template": a.template,
            "system_prompt": a.system_prompt,
            "judge": judge_settings,
            "judges": [spec for spec, _ in judges] if a.harmful_data is not None else None,
            "source_column": a.source_column,
            "category_column": a.category_column,
            "disjoint_from": a.disjoint_from,
            "margin": (
                {"refusal_column": a.refusal_column, "compliance_column": a.compliance_column,
                 "max_length": a.margin_max_length, "answer_tokens": a.margin_answer_tokens}
                if a.margin
                else None
            ),  # fmt: skip
            "dtype": a.dtype,
            "seed": a.seed,
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


# --------------------------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------------------------


def _md(text: Any, width: int = 160) -> str:
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= width else s[: width - 1] + "…"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def summary_markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    c, s = report["counts"], report["settings"]
    """summary.md: the figures of eval.json as Markdown tables, the judge, the settings, the first generations."""
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
    held_out = report.get("held_out_check")
    if held_out:
        files = ", ".join(f"`{_md(f)}` ({n} prompts)" for f, n in held_out["splits"].items())
        lines += ["", f"Held out: the {held_out['prompts']} harmful prompts share none, nor a near-duplicate "
                  f"(content-word Jaccard >= {held_out['threshold']}), with {files}."]  # fmt: skip
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


def write_outputs(
    out: Path, report: dict[str, Any], rows: Sequence[dict[str, Any]], timings: dict[str, float], write_timings: bool,
    verbose: bool, progress: bool,
) -> None:
    """generations.jsonl, eval.json, summary.md (and timings.json), each atomically; the summary or timings shown."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), out / "generations.jsonl")
    atomic_write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", out / "eval.json")
    summary = summary_markdown(report, list(rows))
    atomic_write_text(summary, out / "summary.md")
    seconds = {k: round(v, 2) for k, v in timings.items()}
    seconds["total"] = round(sum(seconds.values()), 2)
    if write_timings:
        atomic_write_text(json.dumps(seconds, indent=2) + "\n", out / "timings.json")
    shown = ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    if verbose:
        print(summary.split("\n## Settings", 1)[0].rstrip())
        print("\ntimings (s): " + shown)
        print(f"wrote {out / 'eval.json'}, {out / 'generations.jsonl'}, {out / 'summary.md'}")
    elif progress:
        print("evaluate: timings (s): " + shown, file=sys.stderr)
