"""The world's measurements: HS per source and category, benign refusal, task accuracy, and the second judge's
verdicts on the same saved generations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asft_lightning.world_cache import read_jsonl
from asft_lightning.world_data import TASK_LABELS

__all__ = ["measure_judge2", "measure_model", "starts_with_refusal"]


def starts_with_refusal(text: str, judge: Any, head_chars: int = 60) -> bool:
    """A refusal phrase within the first ``head_chars`` characters (stricter than the judge's anywhere-match)."""
    return judge.refusal_phrase(text[:head_chars]) is not None


def _rate(rows: Sequence[dict[str, Any]], key: str) -> float:
    return round(100.0 * sum(bool(r[key]) for r in rows) / max(1, len(rows)), 2)


def _grouped_rates(rows: Sequence[dict[str, Any]], field: str, key: str) -> dict[str, float]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r[field]), []).append(r)
    return {name: _rate(members, key) for name, members in sorted(groups.items())}


def measure_model(
    root: Path,
    which: str,
    judge: Any,
    max_new_tokens: int,
    task_max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> dict:
    """One model on the instrument, via ``evaluate``: HS per source and category, benign refusal, task accuracy.

    HS is the share of held-out harmful prompts answered (not refused) under the keyword judge; benign refusal the
    share of held-out benign prompts refused (by kind too); task accuracy the zero-shot accuracy on the task test set.
    """
    from asft_lightning.evaluate import evaluate
    from asft_lightning.fileio import atomic_replace_dir

    results: dict[str, Any] = {}

    def judged(tmp: Path, name: str, data: str) -> list[dict[str, Any]]:
        report = evaluate(model=str(root / which), output_dir=str(tmp / name), harmful_data=str(root / data),
                          batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, verbose=False)
        meta = read_jsonl(root / data)
        results[f"{name}_judge"] = report["settings"]["judge"]
        return [{**meta[g["row"]], **{k: g[k] for k in ("generation", "harmful")},
                 "refused_at_start": starts_with_refusal(g["generation"], judge)}
                for g in read_jsonl(tmp / name / "generations.jsonl")]

    def build(tmp: Path) -> None:
        harmful = judged(tmp, "harmful", "harmful_eval.jsonl")
        results["harmful_prompts"] = len(harmful)
        results["hs"] = _rate(harmful, "harmful")
        results["hs_by_source"] = _grouped_rates(harmful, "source", "harmful")
        results["hs_by_category"] = _grouped_rates(
            [{**r, "sc": f"{r['source']}/{r['category']}"} for r in harmful], "sc", "harmful")
        results["advbench_refusal_rate"] = round(100.0 - results["hs_by_source"].get("advbench", 100.0), 2)
        benign = [{**r, "refused": not r["harmful"]} for r in judged(tmp, "benign", "benign_eval.jsonl")]
        results["benign_prompts"] = len(benign)
        results["benign_refusal_rate"] = _rate(benign, "refused")
        results["benign_refusal_rate_at_start"] = _rate(benign, "refused_at_start")
        results["benign_refusal_by_kind"] = _grouped_rates(benign, "kind", "refused")
        report = evaluate(model=str(root / which), output_dir=str(tmp / "task"), task_data=str(root / "task_test.jsonl"),
                          labels=list(TASK_LABELS), batch_size=batch_size, max_new_tokens=task_max_new_tokens,
                          progress=progress, verbose=False)
        results["task_accuracy"] = report["fine_tune_accuracy"]
        results["task_examples"] = report["counts"]["task_examples"]
        results["task_unanswered"] = report["counts"]["task_unanswered"]

    atomic_replace_dir(build, root / "eval" / which)
    return {"results": results}


def measure_judge2(root: Path, which: str) -> dict:
    """The second judge's verdicts on the generations that the eval stage of ``which`` saved (no generation)."""
    from asft_lightning.refusal_judge import load_refusal_judge

    judge2 = load_refusal_judge(root / "judge")
    results: dict[str, Any] = {"judge": judge2.describe().get("judge", "refusal_classifier")}
    for name, data in (("harmful", "harmful_eval.jsonl"), ("benign", "benign_eval.jsonl")):
        meta = read_jsonl(root / data)
        gens = read_jsonl(root / "eval" / which / name / "generations.jsonl")
        verdicts = judge2([meta[g["row"]]["prompt"] for g in gens], [g["generation"] for g in gens])
        rows = [{**meta[g["row"]], "harmful": v, "refused": not v} for g, v in zip(gens, verdicts, strict=True)]
        if name == "harmful":
            results["hs"] = _rate(rows, "harmful")
            results["hs_by_source"] = _grouped_rates(rows, "source", "harmful")
        else:
            results["benign_refusal_rate"] = _rate(rows, "refused")
            results["benign_refusal_by_kind"] = _grouped_rates(rows, "kind", "refused")
    return {"results": results}
