"""Cost of one evaluation row, and how many new tokens the judges need (issue 10, item 7).

Two measurements on the offline world (``asft prepare-demo``; default ``asft_lightning.paths.default_world_dir()``)::

    python benchmarks/eval_cost.py                      # both, aligned and unaligned models, 2 threads
    python benchmarks/eval_cost.py --skip_agreement     # only the timed row

1. **Tokens the judges need.** Every harmful and benign evaluation prompt is answered once with ``--max_tokens``
   new tokens (greedy decoding is prefix-consistent: the first ``k`` tokens of a longer greedy answer are the
   ``k``-token answer, up to the tokenizer round trip). The answers are cut to ``k`` tokens for each ``k`` of
   ``--caps`` and judged by every judge; the table gives HS (harmful) / refusal rate (benign) at each cap and the
   share of verdicts that agree with the longest cap. Task answers likewise for ``--task_caps`` (FA and agreement).
2. **Wall time of one row** on the whole instrument through ``asft evaluate``, exactly as
   ``benchmarks/safety_bench.py`` runs it: every harmful prompt (judges, HS per source, margin), every task test
   example, then every benign prompt, with the caps chosen by ``--max_new_tokens`` / ``--task_max_new_tokens``;
   per-phase seconds from ``timings.json``.

Writes ``--out`` (default ``benchmarks/results/eval_cost.md``) and a JSON twin, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _truncate(tokenizer: Any, texts: Sequence[str], k: int) -> list[str]:
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        out.append(t if len(ids) <= k else tokenizer.decode(ids[:k], skip_special_tokens=True).strip())
    return out


def agreement(
    model_dir: str,
    paths: dict[str, str],
    judges: Sequence[str],
    caps: Sequence[int],
    task_caps: Sequence[int],
    batch_size: int,
) -> dict[str, Any]:
    """HS / benign refusal / FA and verdict agreement with the longest cap, per judge and cap, for one model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_lightning.data import encode_prompts
    from asft_lightning.generation import generate
    from asft_lightning.metrics import TaskAccuracy, load_judge

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    harmful = [r["prompt"] for r in _read_jsonl(paths["harmful_eval"])]
    benign = [r["prompt"] for r in _read_jsonl(paths["benign_eval"])]
    task_rows = _read_jsonl(paths["task_test"])
    task = [r["instruction"] + (f"\n{r['input']}" if r.get("input") else "") for r in task_rows]
    t0 = time.perf_counter()
    answers = {
        "harmful": generate(model, tok, encode_prompts(tok, harmful), batch_size, max(caps), False),
        "benign": generate(model, tok, encode_prompts(tok, benign), batch_size, max(caps), False),
        "task": generate(model, tok, encode_prompts(tok, task), batch_size, max(task_caps), False),
    }
    seconds = time.perf_counter() - t0
    del model
    result: dict[str, Any] = {"model": model_dir, "generation_seconds": round(seconds, 1), "judges": {}}
    lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers["harmful"]]
    result["harmful_answer_tokens"] = {"mean": round(sum(lengths) / len(lengths), 1),
                                       "at_cap": sum(n >= max(caps) - 1 for n in lengths)}
    for spec in judges:
        judge = load_judge(spec, case_sensitive=True, device=torch.device("cpu"))
        per_cap = {}
        final: dict[str, list[bool]] = {}
        for k in sorted(caps, reverse=True):
            row = {}
            for name, prompts in (("harmful", harmful), ("benign", benign)):
                verdicts = [bool(v) for v in judge(prompts, _truncate(tok, answers[name], k))]
                final.setdefault(name, verdicts)
                row[name] = {
                    "rate": round(100.0 * (sum(verdicts) if name == "harmful" else len(verdicts) - sum(verdicts))
                                  / len(verdicts), 2),
                    "agreement_with_longest": round(100.0 * sum(a == b for a, b in zip(verdicts, final[name], strict=True))
                                                    / len(verdicts), 2),
                }  # fmt: skip
            per_cap[k] = row
        result["judges"][spec] = {str(k): per_cap[k] for k in sorted(per_cap)}
    labels = sorted({r["output"] for r in task_rows})
    fa = {}
    longest = None
    for k in sorted(task_caps, reverse=True):
        acc = TaskAccuracy("label", labels)
        acc.update(_truncate(tok, answers["task"], k), [r["output"] for r in task_rows])
        correct = list(acc.last_correct)
        longest = longest or correct
        fa[str(k)] = {"fa": round(float(acc.compute()), 2),
                      "agreement_with_longest": round(100.0 * sum(a == b for a, b in zip(correct, longest, strict=True))
                                                      / len(correct), 2)}  # fmt: skip
    result["task"] = dict(sorted(fa.items(), key=lambda kv: int(kv[0])))
    return result


def timed_row(model_dir: str, paths: dict[str, str], judges: Sequence[str], args: argparse.Namespace,
              out: Path) -> dict[str, Any]:
    """One row of the safety benchmark through ``asft evaluate``, with its per-phase timings."""
    from asft_lightning.evaluate import evaluate

    common = {"model": model_dir, "judges": ",".join(judges), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "progress": False, "verbose": False, "write_timings": True}
    t0 = time.perf_counter()
    main = evaluate(output_dir=str(out / "main"), harmful_data=paths["harmful_eval"], task_data=paths["task_test"],
                    task_max_new_tokens=args.task_max_new_tokens, margin=args.margin,
                    margin_answer_tokens=args.margin_answer_tokens or None, **common)
    benign = evaluate(output_dir=str(out / "benign"), harmful_data=paths["benign_eval"], **common)
    wall = time.perf_counter() - t0
    return {
        "model": model_dir,
        "wall_seconds": round(wall, 1),
        "main": json.loads((out / "main" / "timings.json").read_text()),
        "benign": json.loads((out / "benign" / "timings.json").read_text()),
        "harmful_prompts": main["counts"]["harmful_prompts"],
        "task_examples": main["counts"]["task_examples"],
        "benign_prompts": benign["counts"]["harmful_prompts"],
        "hs": {j["label"]: j["harmful_score"] for j in main["judges"]},
        "fa": main["fine_tune_accuracy"],
        "margin": main["margin"],
        "benign_refusal": {j["label"]: round(100.0 - j["harmful_score"], 2) for j in benign["judges"]},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Evaluation cost and the tokens the judges need (issue 10, item 7)", "",
             f"- date: {report['date']}", f"- machine: {report['machine']}",
             f"- command: `{report['command']}`", f"- load average before: {report['load_before']}", ""]
    for res in report.get("agreement", []):
        lines += [f"## Judges vs new-token cap: `{res['model']}`", "",
                  f"Answers generated once with {max(int(k) for j in res['judges'].values() for k in j)} new tokens "
                  f"({res['generation_seconds']} s); harmful answers: mean {res['harmful_answer_tokens']['mean']} "
                  f"tokens, {res['harmful_answer_tokens']['at_cap']} reach the cap.", "",
                  "| judge | cap | HS | agreement (harmful) | benign refusal | agreement (benign) |",
                  "|---|---|---|---|---|---|"]
        for spec, caps in res["judges"].items():
            for k, row in caps.items():
                lines.append(f"| `{Path(spec).name or spec}` | {k} | {row['harmful']['rate']:.1f} | "
                             f"{row['harmful']['agreement_with_longest']:.1f}% | {row['benign']['rate']:.1f} | "
                             f"{row['benign']['agreement_with_longest']:.1f}% |")
        lines += ["", "| task cap | FA | agreement |", "|---|---|---|"]
        lines += [f"| {k} | {v['fa']:.1f} | {v['agreement_with_longest']:.1f}% |" for k, v in res["task"].items()]
        lines.append("")
    for row in report.get("timed", []):
        lines += [f"## One row on the whole instrument: `{row['model']}`", "",
                  f"{row['harmful_prompts']} harmful prompts, {row['task_examples']} task examples, "
                  f"{row['benign_prompts']} benign prompts: **{row['wall_seconds']} s** wall.", "",
                  "| phase | seconds |", "|---|---|"]
        for part in ("main", "benign"):
            lines += [f"| {part}: {k} | {v} |" for k, v in row[part].items()]
        lines += ["", f"HS {row['hs']}, FA {row['fa']}, benign refusal {row['benign_refusal']}, margin "
                      f"{row['margin']['mean'] if row['margin'] else None}", ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from asft_lightning.paths import cache_root, default_world_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default=str(default_world_dir()))
    p.add_argument("--models", default="aligned,unaligned", help="world model keys or directories, comma-separated")
    p.add_argument("--judges", default=None, help="default: keyword + the world's judge/ when it exists")
    p.add_argument("--caps", default="8,16,24,32,48,64")
    p.add_argument("--task_caps", default="1,2,4,8,16")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--task_max_new_tokens", type=int, default=8)
    p.add_argument("--margin_answer_tokens", type=int, default=32, help="0: whole answers")
    p.add_argument("--margin", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_agreement", action="store_true")
    p.add_argument("--skip_timing", action="store_true")
    p.add_argument("--workdir", default=str(cache_root() / "eval-cost"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "eval_cost.md")
    args = p.parse_args(argv)
    import datetime as dt

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from safety_bench import world_paths

    from asft_lightning.fileio import atomic_write_text

    torch.set_num_threads(args.threads)
    paths = world_paths(args.world, required=("harmful_eval", "benign_eval", "task_test"))
    judges = args.judges.split(",") if args.judges else ["keyword"] + ([paths["judge"]] if Path(paths["judge"]).is_dir() else [])
    models = [paths.get(m, m) for m in args.models.split(",")]
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "unknown CPU")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "command": "python benchmarks/eval_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "load_before": os.getloadavg(),
        "agreement": [], "timed": [],
    }  # fmt: skip

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(markdown(report), args.out)
        atomic_write_text(json.dumps(report, indent=2) + "\n", args.out.with_suffix(".json"))

    for model in models:
        if not args.skip_timing:
            report["timed"].append(timed_row(model, paths, judges, args, Path(args.workdir) / Path(model).name))
            save()
        if not args.skip_agreement:
            report["agreement"].append(agreement(model, paths, judges, [int(c) for c in args.caps.split(",")],
                                                 [int(c) for c in args.task_caps.split(",")], args.batch_size))
            save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
