"""CurvatureRestoration: run curvature-aware safety restoration at the end of fit (or every N epochs)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from asft_lightning.callbacks._peft import peft_model_of
from asft_lightning.errors import ArgumentError, DataError, SetupError
from asft_lightning.restoration import RestorationConfig, RestorationResult, restore


class CurvatureRestoration(Callback):
    """Steer a LoRA fine-tune back to the aligned model's harmful loss with curvature-aware steps.

    Works with any LightningModule whose ``model`` attribute is a PEFT model (e.g. ``AsFTModule``). At the end of
    training (before the module writes its adapter) or every ``every_n_epochs`` epochs, it runs
    :func:`asft_lightning.restoration.restore` on fixed batches: the first ``num_harmful`` rows of
    ``harmful_data`` and ``num_retain`` retain rows (``retain_data``, or the task rows of the data module's
    training set). Prompts are formatted with the data module's tokenizer, template and system prompt.
    Method: this project's formulation of Bach et al., "Curvature-aware safety restoration", arXiv 2511.18039.

    Under data parallelism (DDP, DeepSpeed ZeRO-1/2/3) the batches are split across ranks (each rank gets the same
    number of batches; the counts must divide) and losses, gradients and HVPs are averaged, so every rank takes the
    same step and the restored adapter equals the single-process result. Under DeepSpeed the LoRA factors are taken
    out of the engine for the run (whole float32 masters in plain layers, :func:`asft_lightning.zero_lora.standalone_lora`)
    and written back into the model and the optimizer's masters afterwards; the frozen base stays partitioned.
    ZeRO-3 needs ``hvp_method`` ``finite_difference`` (``auto`` picks it): its gather/release hooks on the base layers
    give no second derivatives.

    Example::

        trainer:
          callbacks:
            - class_path: asft_lightning.callbacks.CurvatureRestoration
              init_args: {harmful_data: data/harmful.jsonl, max_steps: 10}

    Args:
        harmful_data: harmful prompts with harmful completions (JSON / JSONL / CSV / parquet).
        retain_data: retain (task or benign) pairs; ``None``: the task rows of the training set.
        refusal_data: optional harmful prompts with refusals (used when ``refusal_weight > 0``).
        harmful_prompt_column: prompt column of ``harmful_data`` and ``refusal_data``.
        harmful_response_column: response column of ``harmful_data`` and ``refusal_data``.
        retain_prompt_column: prompt column of ``retain_data``.
        retain_input_column: optional input column of ``retain_data``.
        retain_response_column: response column of ``retain_data``.
        num_harmful: harmful pairs used, >= 1.
        num_retain: retain pairs used, >= 1.
        batch_size: pairs per batch, >= 1.
        every_n_epochs: also run after every N-th training epoch (``None``: only at the end of training).
        report_name: file written into the log directory with every run's record.
        **restoration: the restoration settings, the fields of :class:`~asft_lightning.restoration.RestorationConfig`
            (``method``, ``max_steps``, ``damping``, ``target_margin``, ``hvp_method``, ...), each its own argument.
    """

    def __init__(
        self,
        harmful_data: str,
        retain_data: str | None = None,
        refusal_data: str | None = None,
        harmful_prompt_column: str = "prompt",
        harmful_response_column: str = "response",
        retain_prompt_column: str = "instruction",
        retain_input_column: str | None = "input",
        retain_response_column: str = "output",
        num_harmful: int = 64,
        num_retain: int = 64,
        batch_size: int = 8,
        every_n_epochs: int | None = None,
        report_name: str = "restoration.json",
        **restoration: Any,
    ) -> None:
        super().__init__()
        problems = []
        for name, value in (("num_harmful", num_harmful), ("num_retain", num_retain), ("batch_size", batch_size)):
            if value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if every_n_epochs is not None and every_n_epochs < 1:
            problems.append(f"every_n_epochs must be >= 1 or None, got {every_n_epochs}")
        if restoration.get("refusal_weight", 0) > 0 and refusal_data is None:
            problems.append(f"refusal_weight={restoration['refusal_weight']} > 0 needs refusal_data")
        if problems:
            raise ArgumentError("CurvatureRestoration: " + "; ".join(problems))
        try:
            self.config = RestorationConfig(**restoration)
        except ArgumentError as err:
            raise ArgumentError(f"CurvatureRestoration: {err}") from err
        self.harmful_data = harmful_data
        self.retain_data = retain_data
        self.refusal_data = refusal_data
        self.columns = {
            "harmful": (harmful_prompt_column, harmful_response_column),
            "retain": (retain_prompt_column, retain_input_column, retain_response_column),
        }
        self.num_harmful = num_harmful
        self.num_retain = num_retain
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.report_name = report_name
        self.history: list[dict[str, Any]] = []
        self._batches: tuple | None = None
        self._config_run = self.config

    # ---------------------------------------------------------------------------------------------- checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from asft_lightning.strategies import zero_stage

        if zero_stage(trainer.strategy) == 3:
            if self.config.hvp_method in ("double_backward", "forward_over_reverse"):
                raise ArgumentError(
                    f"CurvatureRestoration: hvp_method={self.config.hvp_method!r} is not supported under DeepSpeed ZeRO "
                    "stage 3 (the base layers' gather/release hooks give no second derivatives); use "
                    "hvp_method='finite_difference' or 'auto' (which picks it)"
                )
            self._config_run = replace(self.config, hvp_method="finite_difference")
        else:
            self._config_run = self.config
        from asft_lightning.data import load_samples

        # Validate the data files now, before any training.
        self._samples = {
            "harmful": load_samples(self.harmful_data, "harmful_data", *self.columns["harmful"], limit=self.num_harmful),
            "refusal": load_samples(self.refusal_data, "refusal_data", *self.columns["harmful"])
            if self.refusal_data else None,
            "retain": load_samples(self.retain_data, "retain_data", self.columns["retain"][0],
                                   self.columns["retain"][2], self.columns["retain"][1], limit=self.num_retain)
            if self.retain_data else None,
        }
        # The rows each restoration will use (the data module's setup has run before the callbacks'): their batch
        # counts must divide over the processes, checked here rather than after the first epoch.
        counts = {"harmful_data": len(self._samples["harmful"])}
        if self._samples["refusal"] is not None:
            counts["refusal_data"] = len(self._samples["refusal"])
        if self._samples["retain"] is not None:
            counts["retain_data"] = len(self._samples["retain"])
        elif getattr(trainer.datamodule, "train_samples", None):
            counts["the training set's task rows"] = len(self._retain_from_training(trainer.datamodule))
        for what, count in counts.items():
            self._check_split(what, count, trainer.world_size)

    def _retain_from_training(self, dm: Any) -> list:
        """Retain rows when no ``retain_data`` is given: the first ``num_retain`` task rows of the training set."""
        return [s for s in dm.train_samples if s.source == "task"][: self.num_retain]

    def _check_split(self, what: str, rows: int, world: int) -> None:
        """Raise unless ``rows`` rows in batches of ``batch_size`` divide evenly over ``world`` processes."""
        batches = -(-rows // self.batch_size)
        if world > 1 and batches % world:
            raise ArgumentError(
                f"CurvatureRestoration: {what} gives {rows} row(s) (num_harmful={self.num_harmful}, "
                f"num_retain={self.num_retain} cap the harmful / retain rows), {batches} batch(es) of "
                f"batch_size={self.batch_size}, which do not divide over {world} processes; choose the counts and "
                f"batch_size so that ceil(rows / batch_size) is a multiple of the world size {world}"
            )

    def _peft_model(self, pl_module: L.LightningModule) -> nn.Module:
        return peft_model_of(pl_module, "CurvatureRestoration")

    def _make_batches(self, trainer: L.Trainer) -> tuple:
        from asft_lightning.data import sample_batches

        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "load_tokenizer"):
            raise SetupError("CurvatureRestoration needs an AsFTDataModule (for the tokenizer and prompt template)")
        tok = dm.load_tokenizer()
        world, rank = trainer.world_size, trainer.global_rank
        retain = self._samples["retain"]
        if retain is None:
            retain = self._retain_from_training(dm)
            if not retain:
                raise DataError("CurvatureRestoration: the training set has no task rows; give retain_data")
            # setup checked the files' rows; these it could only check if the data module had its samples then
            self._check_split("the training set's task rows", len(retain), world)

        def batches(samples):
            if samples is None:
                return None
            out = sample_batches(tok, samples, self.batch_size, dm.max_length, dm.template, dm.system_prompt)
            return out[rank::world]

        return batches(self._samples["harmful"]), batches(retain), batches(self._samples["refusal"])

    # ----------------------------------------------------------------------------------------------- runs
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> RestorationResult:
        """Run one restoration now, log it, and append it to :attr:`history`."""
        model = self._peft_model(pl_module)
        if self._batches is None:
            self._batches = self._make_batches(trainer)
        harmful, retain, refusal = self._batches
        all_reduce = None
        if trainer.world_size > 1:

            def all_reduce(t):
                return trainer.strategy.reduce(t, reduce_op="mean")

        from lightning.pytorch.strategies import DeepSpeedStrategy

        from asft_lightning.zero_lora import standalone_lora

        engine_owned = isinstance(trainer.strategy, DeepSpeedStrategy)
        with standalone_lora(model) if engine_owned else nullcontext():
            result = restore(model, harmful, retain, refusal, self._config_run, all_reduce=all_reduce)
        entry = {"epoch": trainer.current_epoch, "global_step": trainer.global_step, **result.to_dict()}
        self.history.append(entry)
        if trainer.logger is not None:
            for record in result.records:
                trainer.logger.log_metrics(
                    {
                        "restore/harmful_loss": record.harmful_loss,
                        "restore/task_loss": record.task_loss,
                        "restore/step_size": record.step_size,
                    },
                    step=trainer.global_step * 1000 + record.step,
                )
        log_dir = trainer.log_dir  # a collective (a broadcast): every rank must ask
        if trainer.is_global_zero and log_dir:
            from asft_lightning.fileio import atomic_write_text

            atomic_write_text(json.dumps(self.history, indent=2) + "\n", Path(log_dir) / self.report_name)
        return result

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            if not trainer.fit_loop.done:
                self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "config": asdict(self.config)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
