"""Harmful requests from several sources, deduplicated across sources and split once.

Every source ships inside the pinned ``pyrit==1.1.0`` wheel (its SHA-256 is checked before it is read, see
:mod:`asft_lightning.world`); nothing comes from a hub:

* ``advbench``: AdvBench's 520 harmful instructions (Zou et al. 2023), imperative ("Write a tutorial on how to
  ..."); no categories in the file, so a category is given by keyword rules (:func:`advbench_category`);
* ``pyrit_objective``: the objectives of PyRIT's "objective achieved" scorer evaluation sets
  (``scorer_evals/objective/*.csv``, 14 harm categories): questions, first-person stories, role-play framings;
* ``pyrit_harm``: the objectives of PyRIT's graded-harm scorer evaluation sets (``scorer_evals/harm/*.csv``), less
  those already in ``pyrit_objective``;
* ``airt``: PyRIT's AI Red Team seed prompts (``seed_datasets/local/airt/*.prompt``) of harmful categories; small,
  used for alignment only.

Only the *prompts* are used here. The human labels and responses of the scorer sets score the judges
(``benchmarks/judge_agreement.py``) and are never read by this module.

:func:`split_sources` groups near-duplicates across all sources (content-word Jaccard, transitively, as
:func:`asft_lightning.dedup.near_duplicate_groups`), then deals whole groups, category by category, into the
``alignment`` / ``attack`` / ``restoration`` / ``eval`` splits with per-source shares, so that a paraphrase never
straddles two splits and every split sees every category. :func:`check_disjoint` proves it on the result.
"""

from __future__ import annotations

import csv
import io
import random
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from asft_lightning.dedup import content_words, near_duplicate_groups

__all__ = [
    "HarmfulPrompt",
    "SPLITS",
    "SOURCE_SHARES",
    "advbench_category",
    "check_disjoint",
    "load_sources",
    "parse_scorer_csv",
    "split_sources",
]

SPLITS: tuple[str, ...] = ("alignment", "attack", "restoration", "eval")
"""The four disjoint splits: alignment refusals, the fine-tuning attack, restoration data, held-out evaluation."""

SOURCE_SHARES: dict[str, dict[str, float]] = {
    "advbench": {"eval": 0.30, "attack": 0.25, "restoration": 0.10, "alignment": 0.35},
    "pyrit_objective": {"eval": 0.45, "attack": 0.10, "restoration": 0.10, "alignment": 0.35},
    "pyrit_harm": {"eval": 0.45, "attack": 0.10, "restoration": 0.10, "alignment": 0.35},
    "airt": {"alignment": 1.0},
}
"""Share of each source's prompts that each split receives (rounded per category; the rest goes to alignment)."""

_AIRT_FILES = ("harassment", "hate", "illegal", "malware", "misinformation", "scams", "sexual", "violence", "harms",
               "airt_imminent_crisis")
"""AI Red Team seed files with harmful requests (``fairness``, ``leakage`` and the therapist file are not)."""

_ADVBENCH_RULES: tuple[tuple[str, str], ...] = (
    ("self_harm", r"suicide|self-harm|self harm|eating disorder|anorexi|bulimi|cut (?:themselves|yourself)"),
    ("weapons_violence", r"bomb|explosive|weapon|firearm|gun|kill|murder|assassinat|attack|violen|poison|terror"),
    ("cyber", r"hack|malware|virus|ransomware|exploit|password|database|network|computer|cyber|software|phish"),
    ("drugs", r"drug|cocaine|heroin|meth|narcotic|substance"),
    ("fraud_theft", r"steal|theft|fraud|scam|counterfeit|money|identity|launder|shoplift|insider trading|tax"),
    ("hate_harassment", r"hate|racis|discriminat|harass|bully|cyberbully|stalk|defam|minorit|religio"),
    ("misinformation", r"fake news|misinformation|false information|conspiracy|propaganda|hoax|mislead|rumor"),
)
"""AdvBench has no categories: the first rule whose pattern the prompt matches names it, else ``other``."""


@dataclass(frozen=True)
class HarmfulPrompt:
    """One harmful request."""

    prompt: str
    """The request, whitespace-normalised."""
    source: str
    """``advbench``, ``pyrit_objective``, ``pyrit_harm`` or ``airt``."""
    category: str
    """Harm category (lower-case, ``_``-separated)."""


def advbench_category(prompt: str) -> str:
    """A harm category for an AdvBench prompt by keyword rules (:data:`_ADVBENCH_RULES`), else ``"other"``."""
    low = prompt.lower()
    return next((name for name, pattern in _ADVBENCH_RULES if re.search(pattern, low)), "other")


def _norm_category(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_") or "other"


def parse_scorer_csv(text: str, where: str) -> list[tuple[str, str]]:
    """``(objective, harm_category)`` rows of a PyRIT scorer-evaluation CSV (leading ``#`` lines skipped).

    Raises:
        ValueError: no ``objective`` column (the message names ``where``).
    """
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    reader = csv.DictReader(io.StringIO(body))
    if not reader.fieldnames or "objective" not in reader.fieldnames:
        raise ValueError(f"{where}: expected a CSV with an 'objective' column, got columns {reader.fieldnames}")
    return [(" ".join(r["objective"].split()), r.get("harm_category") or "") for r in reader if r.get("objective")]


def _parse_seed_prompt(text: str, where: str) -> tuple[list[str], str]:
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("seeds"), list):
        raise ValueError(f"{where}: expected a YAML mapping with a 'seeds' list")
    cats = data.get("harm_categories") or "other"
    category = cats[0] if isinstance(cats, list) else str(cats)
    values = [" ".join(s["value"].split()) for s in data["seeds"] if isinstance(s, dict) and isinstance(s.get("value"), str)]
    return values, category


def _english(text: str) -> bool:
    return sum(ch.isascii() for ch in text) >= 0.95 * max(1, len(text))


def load_sources(wheel: str | Path, advbench: Sequence[str], max_chars: int = 400) -> list[HarmfulPrompt]:
    """Every harmful prompt of every source, exact duplicates (after whitespace and case folding) kept once.

    Args:
        wheel: The verified ``pyrit-1.1.0`` wheel.
        advbench: AdvBench's prompts (parsed by :func:`asft_lightning.world.parse_advbench`).
        max_chars: Longest prompt kept (long role-play set-ups are dropped: they dominate generation cost).

    Returns:
        Prompts in a fixed order: AdvBench, then the PyRIT sets by file name, then AIRT.
    """
    out: list[HarmfulPrompt] = [HarmfulPrompt(" ".join(p.split()), "advbench", advbench_category(p)) for p in advbench]
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(zf.namelist())
        for source, folder in (("pyrit_objective", "objective"), ("pyrit_harm", "harm")):
            for name in (n for n in names if n.startswith(f"pyrit/datasets/scorer_evals/{folder}/") and n.endswith(".csv")):
                for prompt, category in parse_scorer_csv(zf.read(name).decode("utf-8"), f"{wheel}:{name}"):
                    out.append(HarmfulPrompt(prompt, source, _norm_category(category or Path(name).stem)))
        for stem in _AIRT_FILES:
            name = f"pyrit/datasets/seed_datasets/local/airt/{stem}.prompt"
            values, category = _parse_seed_prompt(zf.read(name).decode("utf-8"), f"{wheel}:{name}")
            out += [HarmfulPrompt(v, "airt", _norm_category(category)) for v in values]
    seen: set[str] = set()
    kept = []
    for p in out:
        key = p.prompt.lower()
        if key in seen or not p.prompt or len(p.prompt) > max_chars or not _english(p.prompt):
            continue
        seen.add(key)
        kept.append(p)
    return kept


def split_sources(
    prompts: Sequence[HarmfulPrompt],
    shares: Mapping[str, Mapping[str, float]] | None = None,
    seed: int = 0,
    threshold: float = 0.6,
) -> dict[str, list[HarmfulPrompt]]:
    """Deal whole near-duplicate groups into the :data:`SPLITS`, stratified by source and category.

    Groups are formed over all sources together (so a paraphrase of an AdvBench prompt in a PyRIT set joins its
    group); a group counts for the source and category of its first member. Within each (source, category) the
    groups are shuffled by ``seed`` and each goes to the split furthest below its target share.

    Args:
        prompts: All prompts (:func:`load_sources`).
        shares: ``{source: {split: share}}`` (default :data:`SOURCE_SHARES`); shares of a source must sum to 1.
        seed: Seed of the deal.
        threshold: Content-word Jaccard at which two prompts are near-duplicates.

    Returns:
        ``{split: [prompt, ...]}`` for every split of :data:`SPLITS`.

    Raises:
        ValueError: a source without shares, an unknown split, or shares that do not sum to 1.
    """
    shares = SOURCE_SHARES if shares is None else shares
    for source, table in shares.items():
        unknown = set(table) - set(SPLITS)
        if unknown or abs(sum(table.values()) - 1.0) > 1e-9 or any(v < 0 for v in table.values()):
            raise ValueError(f"shares[{source!r}] = {dict(table)}: expected non-negative shares of {SPLITS} summing to 1")
    missing = sorted({p.source for p in prompts} - set(shares))
    if missing:
        raise ValueError(f"no split shares for sources {missing}; expected a shares entry for every source")
    groups = near_duplicate_groups([p.prompt for p in prompts], threshold)
    strata: dict[tuple[str, str], list[list[int]]] = {}
    for g in groups:
        first = prompts[g[0]]
        strata.setdefault((first.source, first.category), []).append(g)
    out: dict[str, list[HarmfulPrompt]] = {s: [] for s in SPLITS}
    for (source, category), members in sorted(strata.items()):
        rng = random.Random(f"harmful-split-{seed}-{source}-{category}")
        rng.shuffle(members)
        got = dict.fromkeys(SPLITS, 0)
        table = shares[source]
        for g in members:
            total = sum(got.values()) + len(g)
            # the split with the largest deficit against its share of what has been dealt so far (ties: SPLITS order)
            target = max((s for s in SPLITS if table.get(s, 0) > 0), key=lambda s: table[s] * total - got[s])
            got[target] += len(g)
            out[target] += [prompts[i] for i in g]
    return out


def check_disjoint(splits: Mapping[str, Iterable[HarmfulPrompt]], threshold: float = 0.6) -> dict[str, int]:
    """Prove that no prompt, nor any near-duplicate of one, is in two splits.

    Returns:
        ``{"<a>/<b>": 0, ...}``: the number of near-duplicate links between each pair of splits (all zero).

    Raises:
        ValueError: a pair of splits shares a prompt or a near-duplicate; the message gives the count and examples.
    """
    words = {name: [(p.prompt, content_words(p.prompt)) for p in rows] for name, rows in splits.items()}
    report = {}
    names = list(words)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            links = []
            for pa, wa in words[a]:
                for pb, wb in words[b]:
                    same = pa.lower() == pb.lower()
                    if same or (wa and wb and len(wa & wb) / len(wa | wb) >= threshold):
                        links.append((pa, pb))
            report[f"{a}/{b}"] = len(links)
            if links:
                examples = "; ".join(f"{x[:60]!r} ~ {y[:60]!r}" for x, y in links[:3])
                raise ValueError(f"splits {a!r} and {b!r} share {len(links)} prompts or near-duplicates, e.g. {examples}")
    return report
