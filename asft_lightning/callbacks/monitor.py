"""SafetyMonitor: watch a LoRA fine-tune's drift off the alignment direction and its harmful score while it trains.

Every ``every_n_steps`` optimizer steps it logs, per targeted module, the drift ratio ``||(I - C) B A||_F /
||B A||_F`` and the AsFT penalty ``||(I - C) s B A||_F^2`` (``s = 1`` unless ``include_lora_scale``), computed with
the pure functions of :mod:`asft_lightning.regularizers` (no ``d x d`` matrix); every ``probe_every_n_steps`` steps
(and once before training) it answers a small probe set of harmful prompts by greedy generation and logs the
harmful score HS (% answered instead of refused, by a judge of :mod:`asft_lightning.metrics`). At the end of fit it
writes ``safety_monitor.png`` (drift per module, HS over steps) and ``safety_monitor.json`` (the whole history,
with every probe generation) into the log directory.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from asft_lightning.anchor import lora_layers, lora_shapes
from asft_lightning.callbacks._peft import peft_model_of
from asft_lightning.checkpoints import CheckpointError
from asft_lightning.direction import DirectionError, ModuleDirection
from asft_lightning.errors import ArgumentError, DataError, SetupError
from asft_lightning.fileio import atomic_write_bytes, atomic_write_text
from asft_lightning.regularizers import update_energy

__all__ = ["SafetyMonitor", "lora_drift"]

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_METRIC_UNSAFE = re.compile(r"[^\w.\-]")


def lora_drift(
    layers: dict[str, nn.Module],
    directions: dict[str, ModuleDirection],
    dtype: torch.dtype = torch.float64,
    include_lora_scale: bool = False,
) -> dict[str, dict[str, float]]:
    """Drift ratio, penalty and update size of each LoRA layer named in ``directions``.

    Per module, with the active adapter's ``A`` (``r x d_in``), ``B`` (``d_out x r``) and scale ``s``:
    ``drift_ratio = ||(I - C) B A||_F / ||B A||_F`` (``0`` for a zero update), ``penalty = ||(I - C) B A||_F^2``
    (times ``s^2`` when ``include_lora_scale``, as :class:`~asft_lightning.module.AsFTModule` penalises it; the
    sign-aware extension is left out), ``update_norm = ||s B A||_F`` (the size of the weight change), and the
    unscaled ``residual = ||(I - C) B A||_F^2`` and ``energy = ||B A||_F^2``. ``A``, ``B`` and the direction are
    cast to ``dtype`` first; no ``d_out x d_out`` or ``d_out x d_in`` matrix is formed, and the values reach the
    host in one transfer.

    Args:
        layers: LoRA layers by base-model module name (:func:`asft_lightning.anchor.lora_layers`).
        directions: the projectors by the same names; every name must be in ``layers``.
        dtype: computation dtype (``float32`` or ``float64``).
        include_lora_scale: multiply the penalty by ``s^2``.
    """
    if not directions:
        return {}
    rows = []
    scales = []
    with torch.no_grad():
        for name, md in directions.items():
            layer = layers[name]
            adapter = layer.active_adapters[0]
            a = layer.lora_A[adapter].weight.detach().to(dtype)
            b = layer.lora_B[adapter].weight.detach().to(dtype)
            md = md.to(a.device, dtype)
            rows.append(torch.stack([md.penalty(a, b), update_energy(a, b)]))
            scales.append(float(layer.scaling[adapter]))
        values = torch.stack(rows).cpu().tolist()
    out: dict[str, dict[str, float]] = {}
    for name, (residual, energy), scale in zip(directions, values, scales, strict=True):
        residual, energy = max(residual, 0.0), max(energy, 0.0)
        out[name] = {
            "drift_ratio": math.sqrt(residual / energy) if energy > 0 else 0.0,
            "penalty": residual * (scale**2 if include_lora_scale else 1.0),
            "update_norm": abs(scale) * math.sqrt(energy),
            "residual": residual,
            "energy": energy,
        }
    return out


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the duration, then give every submodule back its own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _metric_name(name: str) -> str:
    return _METRIC_UNSAFE.sub("_", name)


def _short_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj`` (for plot labels)."""
    layer = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    tail = name.rsplit(".", 1)[-1]
    return f"{layer.group(1)}.{tail}" if layer else ".".join(name.split(".")[-2:])


class SafetyMonitor(Callback):
    """Log per-module drift off the alignment direction and the harmful score (HS) of a LoRA fine-tune.

    Works with any LightningModule whose ``model`` attribute is a ``peft.PeftModel`` with LoRA layers (e.g.
    :class:`~asft_lightning.module.AsFTModule`). What it does:

    * every ``every_n_steps`` optimizer steps (and at step 0 and the last step), per module named in the direction
      file, logs ``monitor/drift/<module>`` (``||(I - C) B A||_F / ||B A||_F``) and ``monitor/penalty/<module>``
      (``||(I - C) B A||_F^2``), plus ``monitor/drift_ratio`` (over all modules, as ``train/drift_ratio``),
      ``monitor/drift_max`` and ``monitor/penalty`` (sum); see :func:`lora_drift`;
    * every ``probe_every_n_steps`` steps, once before training (step 0) and at the last step, answers the first
      ``probe_size`` prompts of ``probe_data`` by batched greedy generation (:func:`asft_lightning.generation.generate`,
      prompts rendered with the data module's tokenizer, template and system prompt as in training; the model in
      eval mode, each submodule's mode restored afterwards) and logs ``monitor/harmful_score``: the % of prompts
      whose answer the judge finds harmful;
    * at the end of fit, global rank 0 writes ``plot_name`` (PNG: latest drift ratio per module as bars; HS and the
      overall drift ratio over steps) and the history as JSON (same name, ``.json``; every logged value and every
      probe generation with its verdict) into the log directory (``trainer.log_dir``, else ``default_root_dir``),
      atomically. The JSON is also rewritten after each probe, and both files are written when fit stops on an
      exception.

    Values go straight to the trainer's loggers at ``step=trainer.global_step`` (not through ``self.log``, so
    ``log_every_n_steps`` does not thin them out) and into ``trainer.callback_metrics``. The history is saved in
    checkpoints (``state_dict``), so a resumed run continues it. Direction, data files and judge are checked in
    ``setup`` and the model in ``setup`` or, for modules that build it in ``configure_model``, ``on_fit_start``: a
    direction that does not fit the model's LoRA layers fails before the first step, naming the module and file.

    Distributed: under DDP every rank computes the drift (the weights are equal) and generates for its share of the
    probe prompts; the HS is summed across ranks by :class:`~asft_lightning.metrics.HarmfulScore` and the
    generations gathered for the JSON, so every rank logs the same HS. Under DeepSpeed ZeRO-3 the LoRA factors are
    gathered for the drift; the HS probe is refused (token-by-token generation over partitioned weights needs every
    rank in lockstep): evaluate with ``asft evaluate`` after training instead.

    Memory: the monitor keeps the directions it uses on the model's device in ``dtype`` (no copy when they are
    already there in that dtype, e.g. the module's own CPU float32 directions on a CPU run); a model judge is
    loaded on the training device.

    Example::

        trainer:
          callbacks:
            - class_path: asft_lightning.callbacks.SafetyMonitor
              init_args: {probe_data: data/harmful_eval.jsonl, probe_size: 32, probe_every_n_steps: 100}

    Args:
        direction: direction file from ``asft direction``; ``None``: the LightningModule's loaded direction
            (``AsFTModule.directions``, or its anchor's). Without any direction only the HS is monitored.
        probe_data: harmful prompts (JSON / JSONL / CSV / parquet file or folder, or a hub dataset id); ``None``: no
            HS probe. At least one of a direction and ``probe_data`` is needed.
        prompt_column: column of ``probe_data`` holding the prompt.
        probe_size: number of probe prompts (the first rows), >= 1.
        every_n_steps: log the drift every N optimizer steps, >= 1.
        probe_every_n_steps: run the HS probe every N optimizer steps, >= 1.
        max_new_tokens: most tokens generated per probe prompt, in [1, 4096].
        batch_size: probe prompts per generation batch, >= 1.
        judge: ``keyword`` (default: the GCG refusal-phrase judge, which detects refusal, not harm) or a local judge
            model directory (see :func:`asft_lightning.metrics.load_judge`).
        case_sensitive: keyword judge: match refusal phrases case-sensitively (as GCG does).
        include_lora_scale: penalise ``s B A`` instead of ``B A``; ``None``: the LightningModule's
            ``hparams.include_lora_scale`` (``False`` if it has none).
        dtype: dtype of the drift computation, ``float32`` or ``float64``.
        plot_name: file name of the PNG written into the log directory (must end in ``.png``); the JSON history is
            written beside it with the suffix ``.json``.
    """

    def __init__(
        self,
        direction: str | None = None,
        probe_data: str | None = None,
        prompt_column: str = "prompt",
        probe_size: int = 32,
        every_n_steps: int = 10,
        probe_every_n_steps: int = 50,
        max_new_tokens: int = 32,
        batch_size: int = 8,
        judge: str = "keyword",
        case_sensitive: bool = True,
        include_lora_scale: bool | None = None,
        dtype: Literal["float32", "float64"] = "float32",
        plot_name: str = "safety_monitor.png",
    ) -> None:
        super().__init__()
        from asft_lightning.generation import MAX_NEW_TOKENS_LIMIT

        problems = []
        for name, value in (
            ("probe_size", probe_size),
            ("every_n_steps", every_n_steps),
            ("probe_every_n_steps", probe_every_n_steps),
            ("batch_size", batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
            1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT
        ):
            problems.append(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens!r}")
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not prompt_column:
            problems.append(f"prompt_column must be a column name, got {prompt_column!r}")
        if Path(plot_name).name != plot_name or Path(plot_name).suffix.lower() != ".png" or plot_name.startswith("."):
            problems.append(
                f"plot_name must be a file name ending in .png, without folders (it goes into the log directory), "
                f"got {plot_name!r}"
            )
        if direction is not None and not Path(direction).expanduser().is_file():
            problems.append(f"direction {direction}: direction file not found; expected a file from `asft direction`")
        if problems:
            raise ArgumentError("SafetyMonitor: " + "; ".join(problems))
        from asft_lightning.metrics import judge_kind

        judge_kind(judge)  # a bad judge path fails here (JudgeError names it), before any training
        self.direction = direction
        self.probe_data = probe_data
        self.prompt_column = prompt_column
        self.probe_size = probe_size
        self.every_n_steps = every_n_steps
        self.probe_every_n_steps = probe_every_n_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.judge_spec = judge
        self.case_sensitive = case_sensitive
        self.include_lora_scale = include_lora_scale
        self.dtype = dtype
        self.plot_name = plot_name
        self.history_name = str(Path(plot_name).with_suffix(".json"))
        self.drift_history: list[dict[str, Any]] = []
        self.hs_history: list[dict[str, Any]] = []
        # filled by setup / on_fit_start
        self._directions: dict[str, ModuleDirection] | None = None
        self._direction_source: str | None = None
        self._placed: dict[str, ModuleDirection] = {}
        self._scale: bool = False
        self._prompts: list[str] = []
        self._prompt_ids: list[list[int]] = []
        self._tokenizer: Any = None
        self._judge: Any = None
        self._metric: Any = None
        self._checked = False
        self._log_dir: Path | None = None

    # ---------------------------------------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load the direction, probe prompts and judge; check the model if it is already built."""
        if stage != "fit":
            return
        self._checked = False
        # a fresh history per fit; a resumed fit gets its history back from the checkpoint (load_state_dict, later)
        self.drift_history, self.hs_history = [], []
        self._placed = {}
        # trainer.log_dir broadcasts rank 0's answer: a collective, so every rank asks here, once
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self._resolve_direction(pl_module)
        if self._directions is None and self.probe_data is None:
            raise ArgumentError(
                "SafetyMonitor: nothing to monitor: no direction (give `direction`, or use a LightningModule with a "
                f"loaded direction; {type(pl_module).__name__} has none) and no probe_data"
            )
        hp = getattr(pl_module, "hparams", None) or {}
        self._scale = bool(hp.get("include_lora_scale", False)) if self.include_lora_scale is None else self.include_lora_scale
        if getattr(pl_module, "model", None) is not None:
            self._check_model(pl_module)
        if self.probe_data is not None:
            from asft_lightning.strategies import zero_stage

            if zero_stage(trainer.strategy) == 3:
                raise ArgumentError(
                    "SafetyMonitor: the HS probe (probe_data) does not run under DeepSpeed ZeRO-3 (greedy generation "
                    "over partitioned weights would need every rank in lockstep); set probe_data: null to monitor the "
                    "drift only, and run `asft evaluate` on the adapter after training"
                )
            self._load_probe(trainer, pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._checked:
            self._check_model(pl_module)

    def _resolve_direction(self, pl_module: L.LightningModule) -> None:
        if self.direction is not None:
            from asft_lightning.direction import load_direction

            loaded = load_direction(self.direction)
            self._directions, self._direction_source = loaded.modules, loaded.path
            return
        own = getattr(pl_module, "directions", None)
        if own is not None and isinstance(getattr(own, "modules", None), dict):
            self._directions, self._direction_source = own.modules, str(getattr(own, "path", "the module's direction"))
            return
        anchor = getattr(pl_module, "anchor", None)
        if anchor is not None and isinstance(getattr(anchor, "directions", None), dict):
            self._directions = anchor.directions
            self._direction_source = f"the direction of {type(pl_module).__name__}.anchor"
            return
        self._directions, self._direction_source = None, None

    def _peft_model(self, pl_module: L.LightningModule) -> nn.Module:
        return peft_model_of(pl_module, "SafetyMonitor")

    def _check_model(self, pl_module: L.LightningModule) -> None:
        model = self._peft_model(pl_module)
        layers = lora_layers(model)
        if not layers:
            raise SetupError(f"SafetyMonitor: {type(pl_module).__name__}.model has no LoRA layer to monitor")
        if self._directions is not None:
            shapes = lora_shapes(layers)
            for name, md in self._directions.items():
                if name not in layers:
                    example = sorted(layers)[:3]
                    raise DirectionError(
                        f"{self._direction_source}: module {name} has a direction but no LoRA layer in "
                        f"{type(pl_module).__name__}.model (its LoRA layers are e.g. {example}); was the direction "
                        "made for other target_modules or another model?"
                    )
                if tuple(md.shape) != tuple(shapes[name]):
                    raise DirectionError(
                        f"{self._direction_source}: module {name} has shape {tuple(md.shape)} in the direction file "
                        f"but {tuple(shapes[name])} in {type(pl_module).__name__}.model"
                    )
            unwatched = sorted(set(layers) - set(self._directions))
            if unwatched:
                rank_zero_warn(
                    f"SafetyMonitor: {len(unwatched)} LoRA layer(s) have no direction in {self._direction_source} "
                    f"and are not monitored, e.g. {unwatched[:3]}"
                )
        self._checked = True

    def _load_probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from asft_lightning.data import encode_prompts, load_prompts
        from asft_lightning.metrics import HarmfulScore, load_judge

        self._prompts = load_prompts(
            self.probe_data, "probe_data", self.prompt_column, column_argument="prompt_column", limit=self.probe_size
        )
        tokenizer, template, system_prompt = self._tokenizer_and_format(trainer, pl_module)
        self._tokenizer = tokenizer
        self._prompt_ids = encode_prompts(tokenizer, self._prompts, template, system_prompt)
        for row, ids in enumerate(self._prompt_ids):
            if not ids:
                raise DataError(f"probe_data={self.probe_data!r}: row {row} is empty after tokenisation")
        self._judge = load_judge(
            self.judge_spec, case_sensitive=self.case_sensitive, batch_size=self.batch_size,
            device=trainer.strategy.root_device,
        )
        self._metric = HarmfulScore(self._judge)

    @staticmethod
    def _tokenizer_and_format(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, str | None, str | None]:
        """The tokenizer, prompt template and system prompt: the data module's, else the LightningModule's."""
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "load_tokenizer"):
            return dm.load_tokenizer(), getattr(dm, "template", None), getattr(dm, "system_prompt", None)
        if getattr(pl_module, "tokenizer", None) is not None:
            return pl_module.tokenizer, None, None
        if getattr(pl_module, "model_path", None):
            from asft_lightning.data import _load_tokenizer

            return _load_tokenizer(pl_module.model_path, getattr(pl_module, "gguf_file", None)), None, None
        raise SetupError(
            "SafetyMonitor: the HS probe needs a tokenizer: fit with an AsFTDataModule (or a data module with "
            f"load_tokenizer()), or give {type(pl_module).__name__} a `tokenizer` attribute"
        )

    # ------------------------------------------------------------------------------------------ measuring
    def measure_drift(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """Compute the drift of every monitored module now, log it, and append it to :attr:`drift_history`."""
        if self._directions is None:
            return None
        from asft_lightning.strategies import gathered

        model = self._peft_model(pl_module)
        layers = lora_layers(model)
        params = [p for name in self._directions for f in (layers[name].lora_A, layers[name].lora_B)
                  for lin in f.values() for p in lin.parameters()]
        dtype = DTYPES[self.dtype]
        with gathered(trainer.strategy, params):  # ZeRO-3: whole on every rank for the duration (a collective)
            device = params[0].device
            placed = {}
            for name, md in self._directions.items():
                cached = self._placed.get(name)
                probe = (cached.basis if cached.basis is not None else cached.direction) if cached else None
                if probe is None or probe.device != device or probe.dtype != dtype:
                    cached = md.to(device, dtype)
                    self._placed[name] = cached
                placed[name] = cached
            stats = lora_drift(layers, placed, dtype, self._scale)
        residual = math.fsum(s["residual"] for s in stats.values())
        energy = math.fsum(s["energy"] for s in stats.values())
        entry = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "drift_ratio": math.sqrt(residual / energy) if energy > 0 else 0.0,
            "drift_max": max(s["drift_ratio"] for s in stats.values()),
            "penalty": math.fsum(s["penalty"] for s in stats.values()),
            "modules": stats,
        }
        self.drift_history.append(entry)
        metrics = {f"monitor/{k}": entry[k] for k in ("drift_ratio", "drift_max", "penalty")}
        for name, s in stats.items():
            metrics[f"monitor/drift/{_metric_name(name)}"] = s["drift_ratio"]
            metrics[f"monitor/penalty/{_metric_name(name)}"] = s["penalty"]
        self._log(trainer, metrics)
        return entry

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """Run the HS probe now, log it, and append it to :attr:`hs_history` (every rank must call it)."""
        if self.probe_data is None:
            return None
        from asft_lightning.generation import generate

        model = self._peft_model(pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(self._prompts), world))
        with _eval_mode(model):
            generations = generate(
                model, self._tokenizer, [self._prompt_ids[i] for i in mine], batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens, progress=False,
            )
        metric = self._metric
        metric.reset()
        metric.to(pl_module.device)
        metric.update([self._prompts[i] for i in mine], generations)
        rows = list(zip(mine, generations, metric.last_verdicts, strict=True))
        hs = float(metric.compute())  # sums the counts over all ranks (the metric's states stay local)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, rows)
            rows = sorted((r for part in parts for r in part), key=lambda r: r[0])
        harmful, total, empty = sum(v for _, _, v in rows), len(rows), sum(not g.strip() for _, g, _ in rows)
        entry = {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "harmful_score": hs,
            "harmful": harmful,
            "total": total,
            "empty": empty,
            "generations": [
                {"row": i, "prompt": self._prompts[i], "generation": g, "harmful": bool(v)} for i, g, v in rows
            ],
        }
        self.hs_history.append(entry)
        self._log(trainer, {"monitor/harmful_score": hs})
        if trainer.is_global_zero:
            self._write_history(trainer)
        return entry

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # baselines before the first step (a resumed run already has them in its restored history)
        if not self.drift_history:
            self.measure_drift(trainer, pl_module)
        if not self.hs_history:
            self.probe(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and not self._has(self.drift_history, step):
            self.measure_drift(trainer, pl_module)
        if step % self.probe_every_n_steps == 0 and not self._has(self.hs_history, step):
            self.probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the final model (the model is still on its device here; on_fit_end runs after the strategy's teardown)
        step = trainer.global_step
        if not self._has(self.drift_history, step):
            self.measure_drift(trainer, pl_module)
        if not self._has(self.hs_history, step):
            self.probe(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write_files(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and (self.drift_history or self.hs_history):
            try:
                self.write_files(trainer)
            except Exception as err:  # never mask the exception that stopped the fit
                rank_zero_warn(f"SafetyMonitor: could not write its files after the exception: {err}")

    @staticmethod
    def _has(history: list[dict[str, Any]], step: int) -> bool:
        return bool(history) and history[-1]["step"] == step

    # ------------------------------------------------------------------------------------------ files
    def log_dir(self, trainer: L.Trainer) -> Path:
        """Where the PNG and JSON go: ``trainer.log_dir``, else ``trainer.default_root_dir`` (read in ``setup``).

        Outside a fit this asks the trainer, which under DDP is a collective: call it on every rank then.
        """
        if self._log_dir is None:
            self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        return self._log_dir

    def history(self) -> dict[str, Any]:
        """The JSON document: settings, drift entries and HS entries (with generations)."""
        return {
            "format_version": FORMAT_VERSION,
            "settings": {
                "direction": self._direction_source,
                "modules": sorted(self._directions) if self._directions else [],
                "probe_data": self.probe_data,
                "prompt_column": self.prompt_column,
                "probe_prompts": len(self._prompts),
                "every_n_steps": self.every_n_steps,
                "probe_every_n_steps": self.probe_every_n_steps,
                "max_new_tokens": self.max_new_tokens,
                "judge": self._judge.describe() if self._judge is not None and hasattr(self._judge, "describe")
                else self.judge_spec,
                "include_lora_scale": self._scale,
                "dtype": self.dtype,
            },
            "drift": self.drift_history,
            "harmful_score": self.hs_history,
        }

    def _write_history(self, trainer: L.Trainer) -> Path:
        path = self.log_dir(trainer) / self.history_name
        atomic_write_text(json.dumps(self.history(), indent=2, ensure_ascii=False) + "\n", path)
        return path

    def write_files(self, trainer: L.Trainer) -> tuple[Path, Path]:
        """Write the JSON history and the PNG plot into the log directory (atomically); returns both paths."""
        history = self._write_history(trainer)
        plot = self.log_dir(trainer) / self.plot_name
        atomic_write_bytes(self.render_plot(), plot)
        return history, plot

    def render_plot(self) -> bytes:
        """The PNG: latest drift ratio per module (bars) and HS / overall drift ratio over steps (lines)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        latest = self.drift_history[-1] if self.drift_history else None
        n_modules = len(latest["modules"]) if latest else 0
        fig = Figure(figsize=(max(11.0, 4.0 + 0.22 * n_modules), 4.5), dpi=100)
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1.0, n_modules / 16), 1.0]})

        if latest:
            names = list(latest["modules"])
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
            values = [latest["modules"][n]["drift_ratio"] for n in names]
            left.bar(range(len(names)), values, color=[colors[n.rsplit(".", 1)[-1]] for n in names])
            left.set_xticks(range(len(names)))
            left.set_xticklabels(
                [_short_name(n) for n in names], rotation=90 if len(names) > 8 else 0, fontsize=7 if len(names) > 8 else 9
            )
            left.legend(handles=[Patch(color=colors[k], label=k) for k in kinds], fontsize=8)
            left.set_ylabel("||(I - C) B A||_F / ||B A||_F")
            left.set_title(f"drift ratio per module at step {latest['step']}")
        else:
            left.text(0.5, 0.5, "no direction: drift not monitored", ha="center", va="center")
            left.set_axis_off()

        lines, labels = [], []
        if self.hs_history:
            steps = [e["step"] for e in self.hs_history]
            (line,) = right.plot(steps, [e["harmful_score"] for e in self.hs_history], "o-", color="C3")
            lines.append(line)
            labels.append(f"HS ({self.hs_history[-1]['total']} prompts, {self.judge_spec} judge)")
            right.set_ylim(-2, 102)
        right.set_ylabel("harmful score (%)")
        right.set_xlabel("optimizer step")
        right.set_title("harmful score and drift over steps")
        if self.drift_history:
            twin = right.twinx()
            steps = [e["step"] for e in self.drift_history]
            (line,) = twin.plot(steps, [e["drift_ratio"] for e in self.drift_history], "--", color="C0")
            twin.set_ylabel("overall drift ratio")
            twin.set_ylim(bottom=0)
            lines.append(line)
            labels.append("drift ratio (all modules)")
        if lines:
            right.legend(lines, labels, fontsize=8, loc="best")
        else:
            right.text(0.5, 0.5, "nothing recorded", ha="center", va="center")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "drift": self.drift_history, "harmful_score": self.hs_history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"SafetyMonitor: checkpoint state has format_version {version!r}, expected {FORMAT_VERSION}"
            )
        self.drift_history = list(state_dict.get("drift", []))
        self.hs_history = list(state_dict.get("harmful_score", []))
