"""Evaluation prompts must be held out: refuse an evaluation file that shares prompts with a training split.

"Shares" means the same prompt (case and whitespace folded) or a near-duplicate of one (content-word Jaccard at
least ``threshold``, as :mod:`asft_lightning.dedup` groups paraphrases), so a reworded training prompt does not
pass as held out. Used by ``asft evaluate --disjoint_from`` (and, for a file of an ``asft prepare-demo`` world,
against that world's training splits, :func:`world_training_splits`) and by the safety benchmark before it evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from asft_lightning.dedup import content_words
from asft_lightning.errors import DataError

__all__ = ["HELD_OUT_THRESHOLD", "WORLD_TRAINING_SPLITS", "check_held_out", "overlapping_prompts",
           "world_training_splits"]

HELD_OUT_THRESHOLD = 0.6
"""Content-word Jaccard at which two prompts are near-duplicates (as the world's splits are dealt)."""

WORLD_TRAINING_SPLITS = ("refusals.jsonl", "harmful_attack_prompts.jsonl", "harmful_restore_prompts.jsonl")
"""The harmful prompts an ``asft prepare-demo`` world trains on (``prompt`` field): alignment (refusals), attack
and restoration. Its benign training prompts are not among them: they are template-made, and a few held-out benign
prompts share a template's words with one (the world's data stage keeps the two sets apart word for word)."""


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def overlapping_prompts(
    evaluation: Sequence[str], training: Sequence[str], threshold: float = HELD_OUT_THRESHOLD
) -> list[tuple[str, str]]:
    """Pairs ``(evaluation prompt, training prompt)`` that are equal after folding or near-duplicates.

    Args:
        evaluation: The evaluation prompts.
        training: The prompts of one training / alignment / restoration split.
        threshold: Content-word Jaccard at which two prompts count as near-duplicates (``> 1``: exact only).

    Returns:
        Every overlapping pair, in evaluation order (at most one pair per evaluation prompt).
    """
    exact = {_fold(t): t for t in training}
    words = [(t, content_words(t)) for t in training]
    by_word: dict[str, list[int]] = {}
    for i, (_, w) in enumerate(words):
        for x in w:
            by_word.setdefault(x, []).append(i)
    out = []
    for e in evaluation:
        hit = exact.get(_fold(e))
        if hit is None and threshold <= 1:
            we = content_words(e)
            for i in sorted({i for x in we for i in by_word.get(x, ())}):
                wt = words[i][1]
                if len(we & wt) / len(we | wt) >= threshold:
                    hit = words[i][0]
                    break
        if hit is not None:
            out.append((e, hit))
    return out


def check_held_out(
    evaluation: Sequence[str], splits: Mapping[str, Sequence[str]], eval_name: str = "evaluation file",
    threshold: float = HELD_OUT_THRESHOLD,
) -> dict[str, int]:
    """Raise when any evaluation prompt is in (or a near-duplicate of one in) a training split.

    Args:
        evaluation: The evaluation prompts.
        splits: ``{name: prompts}`` of every split that must not overlap (its file name makes the best name).
        eval_name: Name of the evaluation file, for the message.
        threshold: Near-duplicate threshold (see :func:`overlapping_prompts`).

    Returns:
        ``{split name: 0}`` for every split checked (a record for reports).

    Raises:
        DataError: the count of shared prompts per split, with up to three examples.
    """
    problems = []
    for name, prompts in splits.items():
        pairs = overlapping_prompts(evaluation, prompts, threshold)
        if pairs:
            examples = "; ".join(f"{e[:70]!r} ~ {t[:70]!r}" for e, t in pairs[:3])
            problems.append(f"{len(pairs)} of its {len(evaluation)} prompts are in {name} or near-duplicates of "
                            f"prompts there, e.g. {examples}")
    if problems:
        raise DataError(f"{eval_name}: not held out: " + "; ".join(problems)
                        + "; expected evaluation prompts that no training, alignment or restoration split contains")
    return dict.fromkeys(splits, 0)


def world_training_splits(data: str) -> list[str]:
    """The training split files of the ``asft prepare-demo`` world that the file ``data`` lies in.

    A world is a folder with ``splits.json`` and ``world.json``; its splits are :data:`WORLD_TRAINING_SPLITS` (those
    present), named as ``data`` names its folder. ``[]`` when ``data`` is not a file in such a folder.
    """
    path = Path(data).expanduser()
    folder = path.parent
    if not (path.is_file() and (folder / "splits.json").is_file() and (folder / "world.json").is_file()):
        return []
    return [str(Path(data).parent / name) for name in WORLD_TRAINING_SPLITS if (folder / name).is_file()]
