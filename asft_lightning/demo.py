"""``asft demo``: AsFT against plain LoRA on a safety world, end to end: fine-tune, evaluate, compare.

The world is a folder with a ``world.json`` manifest whose ``paths`` name the aligned model, its alignment
direction, task train / test data, harmful fine-tuning pairs and held-out harmful and benign evaluation prompts:

* ``world="real"`` (the default): the offline SmolLM2-135M world of ``asft prepare-demo`` under
  ``~/.cache/asft-lightning/world`` (see :mod:`asft_lightning.paths`), built on the first run (about 29 minutes on 2 CPU cores) and reused afterwards;
* ``world="tiny"``: the embedded tiny random Llama world (:func:`asft_lightning.tiny.build_tiny_demo_world`) under
  ``.cache/asft-tiny``, built in seconds;
* any other value: the directory of an already built world, used as it is.

The aligned model is fine-tuned twice on ``n`` samples of which a share ``p`` are harmful pairs (the same
data arguments as ``benchmarks/safety_bench.py``), as ``asft fit`` runs it (AsFTModule, AsFTDataModule and a
Lightning Trainer, in-process): plain LoRA
(``lam = 0``) and AsFT (``lam``, with the published ``safelora`` projector or the exact ``subspace`` one, optionally
the sign-aware term). The aligned model and both adapters are then evaluated with :func:`asft_lightning.evaluate.
evaluate`: harmful score HS (held-out harmful prompts answered instead of refused, keyword judge), fine-tune accuracy
FA (task test split) and the benign refusal rate (held-out benign prompts refused).

Evaluation uses a seeded random sample of ``eval_harmful`` / ``eval_benign`` rows of the world's harmful and benign
evaluation files (they are ordered by source and kind) and the first ``eval_task`` task test rows (shuffled by the world).
``prepare-demo`` writes those files in a seeded random order, so the first rows are a random sample and the same one
on every run.

Everything is cached under ``output_dir`` by a hash of its settings (and of the world's files: content for small
files, size and modification time for large ones): each fine-tune (``runs/``), each evaluated row (``results/``,
with ``evaluate``'s own files under ``eval/``), so a second run with the same settings only reprints the table.
``demo.md`` and ``demo.json`` there hold the latest table; every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from asft_lightning.errors import ArgumentError, AsftError
from asft_lightning.paths import default_world_dir

__all__ = ["SETTINGS", "WorldError", "bare_flags", "demo", "load_world"]

REAL_WORLD = str(default_world_dir())
TINY_WORLD = ".cache/asft-tiny"
OUTPUT_ROOT = ".cache/asft-demo"
CACHE_VERSION = 1
SMALL_FILE = 16 * 2**20  # files up to this size are fingerprinted by content, larger ones by size and mtime
REQUIRED_PATHS = ("aligned", "direction", "task_train", "task_test", "harmful_attack", "harmful_eval", "benign_eval")

# Default settings per world preset (world.json["demo"]["preset"], "real" when absent) and mode; any argument of
# demo() that is not None overrides its entry. "fixed" entries have no argument.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "real": {
        "full": {
            "n": 160, "p": 0.1, "epochs": 2, "lr": 2e-4, "batch_size": 8, "max_length": 128, "val_size": 32,
            "eval_harmful": 50, "eval_task": 60, "eval_benign": 30, "max_new_tokens": 16,
        },
        "quick": {
            "n": 64, "p": 0.1, "epochs": 1, "lr": 2e-4, "batch_size": 8, "max_length": 128, "val_size": 16,
            "eval_harmful": 24, "eval_task": 24, "eval_benign": 16, "max_new_tokens": 16,
        },
        "fixed": {"lora_dropout": 0.05, "generation_batch_size": 32, "case_sensitive": True},
    },
    "tiny": {
        "full": {
            "n": 200, "p": 0.5, "epochs": 2, "lr": 3e-3, "batch_size": 8, "max_length": 64, "val_size": 40,
            "eval_harmful": 32, "eval_task": 64, "eval_benign": 16, "max_new_tokens": 8,
        },
        "quick": {
            "n": 48, "p": 0.5, "epochs": 1, "lr": 3e-3, "batch_size": 8, "max_length": 64, "val_size": 8,
            "eval_harmful": 8, "eval_task": 8, "eval_benign": 8, "max_new_tokens": 6,
        },
        # the tiny model refuses with "sorry i cannot help ...", all lower case
        "fixed": {"lora_dropout": 0.0, "generation_batch_size": 16, "case_sensitive": False},
    },
}


def bare_flags(argv: list[str]) -> list[str]:
    """Let the boolean switches stand alone on the command line: ``--quick`` means ``--quick true``."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in ("--quick", "--force", "--verbose") and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("true")
    return out


class WorldError(AsftError, FileNotFoundError):
    """``world`` is not a built world (no ``world.json``, no ``paths`` in it, or a file it names is missing)."""


# --------------------------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------------------------


def _build_hint(root: Path) -> str:
    return f"build it with `asft prepare-demo --cache_dir {root}` (or run `asft demo --world real` for the default one)"


def load_world(root: str | os.PathLike) -> dict[str, Any]:
    """Read a built world's manifest: ``{"root", "preset", "paths"}`` with every path absolute and checked.

    Raises:
        WorldError: no ``world.json`` in ``root``, no ``paths`` in it, or a required file is missing; the message
            names the directory and the command that builds it.
    """
    root = Path(root).expanduser()
    manifest_path = root / "world.json"
    if not manifest_path.is_file():
        what = "no such directory" if not root.exists() else "no world.json there"
        raise WorldError(f"world={str(root)!r} is not a built world ({what}: {manifest_path.absolute()}); {_build_hint(root)}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorldError(f"world={str(root)!r}: {manifest_path} is not valid JSON ({err}); {_build_hint(root)}") from err
    paths = manifest.get("paths") if isinstance(manifest, dict) else None
    if not isinstance(paths, dict):
        raise WorldError(
            f"world={str(root)!r}: {manifest_path} has no 'paths' (the build did not finish?); {_build_hint(root)}"
        )
    resolved = {k: str(v if os.path.isabs(v) else root / v) for k, v in paths.items() if isinstance(v, str)}
    missing = [k for k in REQUIRED_PATHS if k not in resolved]
    if missing:
        raise WorldError(f"world={str(root)!r}: {manifest_path} lacks paths {missing}; {_build_hint(root)}")
    absent = [f"{k} ({resolved[k]})" for k in REQUIRED_PATHS if not Path(resolved[k]).exists()]
    if absent:
        raise WorldError(f"world={str(root)!r}: missing {', '.join(absent)}; {_build_hint(root)}")
    preset = (manifest.get("demo") or {}).get("preset", "real")
    if preset not in SETTINGS:
        raise WorldError(f"world={str(root)!r}: unknown demo preset {preset!r} in {manifest_path}; known: {sorted(SETTINGS)}")
    return {"root": str(root), "preset": preset, "paths": resolved}


def _fingerprint(path: Path) -> Any:
    """Content hash of a small file, size and mtime of a large one, recursively for a directory."""
    from asft_lightning.fileio import sha256_file

    if path.is_dir():
        return [[str(f.relative_to(path)), _fingerprint(f)] for f in sorted(path.rglob("*")) if f.is_file()]
    st = path.stat()
    return sha256_file(path) if st.st_size <= SMALL_FILE else [st.st_size, st.st_mtime_ns]


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _resolve_world(world: str, verbose: bool) -> tuple[dict[str, Any], str]:
    """Build (``real`` / ``tiny``, cached) or check (a directory) the world; return it and its short name."""
    if world == "real":
        from asft_lightning.world import prepare_demo

        prepare_demo(cache_dir=REAL_WORLD, verbose=verbose)
        return load_world(REAL_WORLD), "real"
    if world == "tiny":
        from asft_lightning.tiny import build_tiny_demo_world

        build_tiny_demo_world(TINY_WORLD)
        return load_world(TINY_WORLD), "tiny"
    info = load_world(world)
    root = Path(world).expanduser().resolve()
    name = "real" if root == Path(REAL_WORLD).resolve() else root.name or "world"
    return info, name


# --------------------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------------------


def _fine_tune(model: dict[str, Any], data: dict[str, Any], seed: int, epochs: int, root: Path, progress: bool) -> Any:
    """``asft fit`` of :class:`AsFTModule` on :class:`AsFTDataModule` from Python: the objects and the trainer.

    The same run as ``asft fit --seed_everything=seed --model.* --data.* --trainer.*`` with this trainer, without the
    command-line layer, and with Lightning's info lines (devices, tips) held back: the demo prints its own phases.
    """
    import logging

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from asft_lightning.data import AsFTDataModule
    from asft_lightning.module import AsFTModule

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        L.seed_everything(seed, workers=True, verbose=False)
        module, datamodule = AsFTModule(**model), AsFTDataModule(**data)
        trainer = L.Trainer(
            max_epochs=epochs, default_root_dir=root, accelerator="cpu", devices=1, logger=CSVLogger(root),
            enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1,
        )
        trainer.fit(module, datamodule=datamodule)
    finally:
        lightning_log.setLevel(level)
    return trainer


class _Demo:
    def __init__(self, info: dict[str, Any], settings: dict[str, Any], out: Path, force: bool, verbose: bool) -> None:
        self.paths = info["paths"]
        self.s = settings
        self.out = out
        self.force = force
        self.verbose = verbose
        self.world_key = _key({k: _fingerprint(Path(self.paths[k])) for k in REQUIRED_PATHS})
        self.subspace_key = None
        if settings["projector"] == "subspace":  # the subspace direction also depends on the unaligned model
            if "unaligned" not in self.paths or not Path(self.paths["unaligned"]).exists():
                raise WorldError(f"world={info['root']!r}: no unaligned model, needed by projector='subspace'")
            self.subspace_key = _key([self.world_key, _fingerprint(Path(self.paths["unaligned"])), settings["rank"]])

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def _load(self, path: Path) -> dict[str, Any] | None:
        if self.force or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def _save(self, record: dict[str, Any], path: Path) -> None:
        from asft_lightning.fileio import atomic_write_text

        atomic_write_text(json.dumps(record, indent=2) + "\n", path)

    def direction(self, projector: str) -> str:
        if projector == "safelora":
            return self.paths["direction"]
        from asft_lightning.direction import extract_direction

        rank = self.s["rank"]
        path = self.out / "directions" / f"subspace-k{rank}-{self.subspace_key}.safetensors"
        if not path.is_file():
            self.log(f"[demo] subspace direction (rank {rank}) -> {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            extract_direction(
                self.paths["aligned"], self.paths["unaligned"], str(path), projector="subspace", rank=rank,
                hash_inputs=False,
            )
        return str(path)

    def fit(self, name: str, lam: float, projector: str, sign_weight: float) -> dict[str, Any]:
        """Fine-tune (or reuse the cached fine-tune of) the aligned model; returns the fit record."""
        s = self.s
        settings = {
            "world": self.world_key, "version": CACHE_VERSION, "lam": lam, "sign_weight": sign_weight,
            "direction": "safelora" if projector == "safelora" else f"subspace-k{s['rank']}-{self.subspace_key}",
            **{k: s[k] for k in ("n", "p", "epochs", "lr", "batch_size", "max_length", "val_size", "seed",
                                 "lora_dropout")},
        }
        key = _key(settings)
        run = self.out / "runs" / f"{name}-{key}"
        adapter = run / "adapter"
        record_path = run / "fit.json"
        record = self._load(record_path)
        if record is not None and (adapter / "adapter_model.safetensors").is_file():
            self.log(f"[demo] {name}: fine-tune cached ({record['seconds']:.0f} s when run): {adapter}")
            return {**record, "cached": True}
        direction = self.direction(projector)
        self.log(f"[demo] {name}: fine-tuning the aligned model (lam={lam}, {projector} projector) ...")
        start = time.perf_counter()
        trainer = _fine_tune(
            model={"model": self.paths["aligned"], "direction": direction, "lam": lam, "sign_weight": sign_weight,
                   "learning_rate": s["lr"], "lora_dropout": s["lora_dropout"], "adapter_output": str(adapter)},
            data={"tokenizer": self.paths["aligned"], "task_data": self.paths["task_train"],
                  "harmful_data": self.paths["harmful_attack"], "n": s["n"], "harmful_ratio": s["p"],
                  "val_size": s["val_size"], "max_length": s["max_length"], "batch_size": s["batch_size"],
                  "seed": s["seed"]},
            seed=s["seed"], epochs=s["epochs"], root=run, progress=self.verbose,
        )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        record = {
            "name": name,
            "adapter": str(adapter),
            "direction": direction,
            "seconds": round(time.perf_counter() - start, 1),
            "steps": int(trainer.global_step),
            "train_drift_ratio": metrics.get("train/drift_ratio"),
            "val_task_loss": metrics.get("val/task_loss"),
            "settings": settings,
        }
        self._save(record, record_path)
        return {**record, "cached": False}

    def _sample(self, key: str, n: int) -> str:
        """A seeded random sample of ``n`` rows of the world file ``key`` (the files are ordered by source and kind,
        so their first rows are not a fair sample), written once into the output folder."""
        import random

        from asft_lightning.fileio import atomic_write_text

        src = Path(self.paths[key])
        lines = [line for line in src.read_text().splitlines() if line.strip()]
        random.Random(f"demo-sample-{key}").shuffle(lines)
        dest = self.out / "samples" / f"{key}-{n}-{_key(self.world_key)}.jsonl"
        if not dest.is_file():
            atomic_write_text("".join(line + "\n" for line in lines[:n]), dest)
        return str(dest)

    def row(self, name: str, label: str, fit: dict[str, Any] | None) -> dict[str, Any]:
        """Evaluate (or reuse the cached evaluation of) the aligned model with ``fit``'s adapter (None: none)."""
        from asft_lightning.evaluate import evaluate

        s = self.s
        settings = {
            "world": self.world_key, "version": CACHE_VERSION, "sample": "seeded-shuffle",
            "fit": None if fit is None else fit["settings"],
            **{k: s[k] for k in ("eval_harmful", "eval_task", "eval_benign", "max_new_tokens",
                                 "generation_batch_size", "case_sensitive")},
        }
        key = _key(settings)
        path = self.out / "results" / f"{name}-{key}.json"
        record = self._load(path)
        if record is not None:
            self.log(f"[demo] {name}: evaluation cached")
            return {**record, "label": label, "cached": True}
        self.log(f"[demo] {name}: evaluating ...")
        adapter = None if fit is None else fit["adapter"]
        eval_dir = self.out / "eval" / f"{name}-{key}"
        common = {
            "model": self.paths["aligned"], "adapter": adapter, "batch_size": s["generation_batch_size"],
            "max_new_tokens": s["max_new_tokens"], "case_sensitive": s["case_sensitive"],
            "progress": self.verbose, "verbose": False,
        }
        start = time.perf_counter()
        main = evaluate(
            output_dir=str(eval_dir / "main"), harmful_data=self._sample("harmful_eval", s["eval_harmful"]),
            task_data=self.paths["task_test"], task_limit=s["eval_task"], **common,
        )
        benign = evaluate(
            output_dir=str(eval_dir / "benign"), harmful_data=self._sample("benign_eval", s["eval_benign"]),
            **common,
        )
        eval_seconds = round(time.perf_counter() - start, 1)
        fit_seconds = 0.0 if fit is None else fit["seconds"]
        record = {
            "name": name,
            "HS": main["harmful_score"],
            "FA": main["fine_tune_accuracy"],
            "benign_refusal": None if benign["harmful_score"] is None else round(100.0 - benign["harmful_score"], 6),
            "seconds": round(fit_seconds + eval_seconds, 1),
            "fit_seconds": fit_seconds,
            "eval_seconds": eval_seconds,
            "harmful_prompts": main["counts"]["harmful_prompts"],
            "task_examples": main["counts"]["task_examples"],
            "benign_prompts": benign["counts"]["harmful_prompts"],
            "adapter": adapter,
            "train_drift_ratio": None if fit is None else fit["train_drift_ratio"],
            "val_task_loss": None if fit is None else fit["val_task_loss"],
            "eval_dir": str(eval_dir),
            "settings": settings,
        }
        self._save(record, path)
        return {**record, "label": label, "cached": False}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | HS | FA | benign refusal | time s |", "|---|---|---|---|---|"]
    for r in rows:
        seconds = f"{r['seconds']:.1f}" + (" (cached)" if r["cached"] else "")
        lines.append(f"| {r['label']} | {_cell(r['HS'])} | {_cell(r['FA'])} | {_cell(r['benign_refusal'])} | {seconds} |")
    return "\n".join(lines)


def _notes(rows: list[dict[str, Any]], s: dict[str, Any], quick: bool, preset: str) -> list[str]:
    r = rows[0]
    k_h, k_t, k_b = r["harmful_prompts"], r["task_examples"], r["benign_prompts"]
    notes = [
        "HS: % of held-out harmful prompts answered instead of refused (keyword judge; lower is better). FA: % of "
        "task test examples answered correctly (higher is better). Benign refusal: % of held-out benign prompts "
        "refused. Time: fine-tune + evaluation seconds of the run that computed the row ((cached): reused).",
        f"Fine-tunes: n={s['n']} samples, harmful share p={s['p']}, {s['epochs']} epoch(s), lr {s['lr']}, batch "
        f"{s['batch_size']}, max_length {s['max_length']}, seed {s['seed']}. Evaluation: the first {k_h} / {k_t} / "
        f"{k_b} rows of the harmful / task / benign evaluation files (a fixed seeded sample), greedy, "
        f"{s['max_new_tokens']} new tokens.",
        f"Noise: one prompt is {100 / k_h:.1f} HS points, one example {100 / k_t:.1f} FA points; the standard "
        f"error of a rate near 50% is about {50 / math.sqrt(k_h):.0f} (HS) / {50 / math.sqrt(k_t):.0f} (FA) points. "
        "One seed: differences of a few points are noise.",
    ]
    if quick:
        notes.insert(0, "QUICK setting: a smoke test with few samples and prompts; its numbers are very noisy and say "
                     "little about AsFT against LoRA. Run without --quick for the comparison.")
    if preset == "tiny":
        notes.insert(0, "TINY world: a random 2-layer toy model; the numbers only show that the pipeline runs.")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def demo(
    world: str = "real",
    quick: bool = False,
    projector: Literal["safelora", "subspace"] = "safelora",
    lam: float = 1.0,
    sign_weight: float = 0.0,
    rank: int = 32,
    n: int | None = None,
    p: float | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    eval_harmful: int | None = None,
    eval_task: int | None = None,
    eval_benign: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 42,
    output_dir: str | None = None,
    threads: int | None = None,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """AsFT against plain LoRA end to end: fine-tune the aligned model on task data with harmful data mixed in, evaluate.

    Builds (first run, about 29 min on 2 CPU cores) or reuses the world, fine-tunes the aligned model with plain
    LoRA (lam=0) and with AsFT, evaluates the aligned model and both adapters, and prints a Markdown table
    ``| model | HS | FA | benign refusal | time s |`` (also written, with a JSON, to output_dir). Fine-tunes and
    evaluations are cached by their settings, so a re-run is fast. Full setting (real world): n=160, p=0.1,
    2 epochs, 50 harmful / 60 task / 30 benign prompts, about 10 min on 2 CPU cores once the world is built;
    --quick: n=64, 1 epoch, 24 / 24 / 16 prompts, a few minutes, noisy numbers.

    Args:
        world: "real": the offline SmolLM2-135M world of asft prepare-demo (~/.cache/asft-lightning/world, built if missing);
            "tiny": the embedded tiny random world (.cache/asft-tiny, seconds); else the directory of a built
            world (with world.json).
        quick: Smaller default settings (fewer samples, one epoch, fewer evaluation prompts): a smoke test.
        projector: AsFT's projector: "safelora" (the published C = V V^T / ||V||_F, the world's direction file) or
            "subspace" (the exact projector on V's top-rank left singular vectors, extracted once and cached).
        lam: AsFT penalty weight.
        sign_weight: weight of the sign-aware extension (0: off); needs projector="safelora".
        rank: subspace rank for projector="subspace".
        n: fine-tuning samples (task + harmful). None: 160 (quick 64).
        p: share of harmful samples. None: 0.1.
        epochs: training epochs. None: 2 (quick 1).
        lr: learning rate (AdamW). None: 2e-4.
        batch_size: training batch size. None: 8.
        max_length: most tokens per training example. None: 128.
        eval_harmful: evaluate HS on a seeded random sample of this many held-out harmful prompts. None: 50 (quick 24).
        eval_task: evaluate FA on the first this many task test examples. None: 60 (quick 24).
        eval_benign: benign refusal on the first this many held-out benign prompts. None: 30 (quick 16).
        max_new_tokens: tokens generated per evaluation prompt. None: 16.
        seed: seed of the data draw and the training.
        output_dir: folder for the cache and demo.md / demo.json. None: .cache/asft-demo/<world name>.
        threads: torch CPU threads (None: torch's default).
        force: recompute every fine-tune and evaluation instead of reusing the cache (the world is still reused).
        verbose: print progress.

    Returns:
        The content of demo.json: rows (HS, FA, benign refusal, seconds, ...), settings, table, notes.
    """
    problems = []
    for name, value, low in (("n", n, 1), ("epochs", epochs, 1), ("batch_size", batch_size, 1),
                             ("max_length", max_length, 8), ("eval_harmful", eval_harmful, 1),
                             ("eval_task", eval_task, 1), ("eval_benign", eval_benign, 1),
                             ("max_new_tokens", max_new_tokens, 1), ("threads", threads, 1), ("rank", rank, 1)):
        if value is not None and value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    if p is not None and not 0 <= p <= 1:
        problems.append(f"p must be in [0, 1], got {p}")
    if lr is not None and not lr > 0:
        problems.append(f"lr must be > 0, got {lr}")
    if lam < 0:
        problems.append(f"lam must be >= 0, got {lam}")
    if sign_weight < 0:
        problems.append(f"sign_weight must be >= 0, got {sign_weight}")
    if projector not in ("safelora", "subspace"):
        problems.append(f"projector must be 'safelora' or 'subspace', got {projector!r}")
    elif projector == "subspace" and sign_weight > 0:
        problems.append("sign_weight > 0 needs the full direction V: use projector='safelora'")
    if problems:
        raise ArgumentError("demo: " + "; ".join(problems))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        info, world_name = _resolve_world(world, verbose)
        preset = info["preset"]
        given = {"n": n, "p": p, "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
                 "eval_harmful": eval_harmful, "eval_task": eval_task, "eval_benign": eval_benign,
                 "max_new_tokens": max_new_tokens}
        settings = {
            **SETTINGS[preset]["quick" if quick else "full"],
            **SETTINGS[preset]["fixed"],
            **{k: v for k, v in given.items() if v is not None},
            "projector": projector, "lam": lam, "sign_weight": sign_weight, "rank": rank, "seed": seed,
        }
        out = Path(output_dir if output_dir is not None else Path(OUTPUT_ROOT) / world_name).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        run = _Demo(info, settings, out, force, verbose)
        asft_label = f"AsFT ({projector}{f' k={rank}' if projector == 'subspace' else ''}, lam={lam:g}" + (
            f", sign_weight={sign_weight:g})" if sign_weight > 0 else ")"
        )
        rows = [run.row("aligned", "aligned", None)]
        rows.append(run.row("lora", "plain LoRA (lam=0)", run.fit("lora", 0.0, "safelora", 0.0)))
        rows.append(run.row("asft", asft_label, run.fit("asft", lam, projector, sign_weight)))
        table = _table(rows)
        notes = _notes(rows, settings, quick, preset)
        seconds = round(time.perf_counter() - start, 1)
        report = {
            "world": info["root"],
            "preset": preset,
            "quick": quick,
            "settings": settings,
            "rows": rows,
            "table": table,
            "notes": notes,
            "seconds": seconds,
            "outputs": {"markdown": str(out / "demo.md"), "json": str(out / "demo.json")},
        }
        title = f"# asft demo: aligned vs plain LoRA vs AsFT ({preset} world{', quick' if quick else ''})"
        markdown = "\n".join([title, "", table, "", *(f"- {x}" for x in notes), "",
                              f"World: `{info['root']}`. This run: {seconds:.1f} s.", ""])
        from asft_lightning.fileio import atomic_write_text

        atomic_write_text(markdown, out / "demo.md")
        atomic_write_text(json.dumps(report, indent=2) + "\n", out / "demo.json")
        if verbose:
            print("\n" + markdown + f"\nwrote {out / 'demo.md'} and {out / 'demo.json'}", flush=True)
        return report
    finally:
        torch.set_num_threads(old_threads)
