"""Benign prompts in the harmful sets' phrasings: disjoint topics, kinds, determinism."""

from __future__ import annotations

import pytest

from asft_lightning import benign_prompts as B


def test_train_and_eval_are_disjoint_and_cover_every_kind():
    train, evaluation = B.benign_phrasing_prompts(seed=0)
    assert (train, evaluation) == B.benign_phrasing_prompts(seed=0)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in evaluation})
    kinds = {"borderline", "question", "story", "roleplay", "research", "persuasive", "fiction"}
    assert {r["kind"] for r in train} == kinds == {r["kind"] for r in evaluation}
    assert sum(r["kind"] == "borderline" for r in evaluation) >= 30
    # training topics never reappear in evaluation, whatever the frame
    for kind in ("borderline", "question"):
        assert set(B._TRAIN[kind]).isdisjoint(B._EVAL[kind])
    assert len({r["prompt"] for r in train}) == len(train)


def test_frames_per_topic():
    one, _ = B.benign_phrasing_prompts(seed=1, train_frames_per_topic=1)
    two, _ = B.benign_phrasing_prompts(seed=1, train_frames_per_topic=2)
    n_topics = sum(len(t) for t in B._TRAIN.values())
    assert len(two) - len(one) == n_topics
    with pytest.raises(ValueError, match="train_frames_per_topic must be in"):
        B.benign_phrasing_prompts(train_frames_per_topic=0)
