"""Near-duplicate prompts: content words and transitive Jaccard groups, so paraphrases stay in one split.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

__all__ = ['content_words', 'near_duplicate_groups']


_STOPWORDS = frozenset(
    "a an the to for of on in and or that how can with into from by as is be it its your their someone people who "
    "which what this these those without using use make create write develop provide give instructions tutorial "
    "guide step detailed explain teach design plan program script website app social media post article blog "
    "outline describe generate produce".split()
)


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in _STOPWORDS)


def near_duplicate_groups(prompts: Sequence[str], threshold: float = 0.6) -> list[list[int]]:
    """Groups of prompt indices that paraphrase each other, joined transitively (union-find).

    Two prompts are linked when the Jaccard similarity of their content words (lower-case words of 3+ letters
    without instruction verbs and function words) is at least ``threshold``; ``threshold > 1`` links only exact
    duplicates (same normalised text). Groups are in order of their first member.
    """
    parent = list(range(len(prompts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    words = [content_words(p) for p in prompts]
    norm = [" ".join(p.lower().split()) for p in prompts]
    for i, j in itertools.combinations(range(len(prompts)), 2):
        a, b = words[i], words[j]
        if norm[i] == norm[j] or (a and b and len(a & b) / len(a | b) >= threshold):
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])
