"""AsFTModule: LoRA fine-tuning of a causal LM with the AsFT regulariser (arXiv 2506.08473).

``loss = CE(response tokens) + lam * sum_l ||(I - C_l) B_l A_l||_F^2``; ``lam = 0`` is plain LoRA SFT.
``anchor``, ``sign_weight`` and ``component_weight`` choose other penalties (:mod:`asft_lightning.anchor_forms`).
The penalty is computed inside each LoRA layer's forward by :class:`~asft_lightning.anchor.LoraAnchor`, so it
stays correct when parameters are sharded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from asft_lightning.anchor import LoraAnchor, lora_layers, lora_shapes
from asft_lightning.anchor_forms import Anchor, check_direction, check_strengths
from asft_lightning.checkpoints import (
    CheckpointError,
    architecture_fingerprint,
    load_model_config,
    split_gguf,
)
from asft_lightning.direction import DirectionSet, load_direction
from asft_lightning.errors import ArgumentError, AsftError
from asft_lightning.fileio import atomic_replace_dir
from asft_lightning.strategies import gathered, hf_zero3_init, outside_zero_init, zero_stage


class NonFiniteLossError(AsftError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step, epoch and batch."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not ``-100``.

    Half-precision logits are upcast to float32; float64 stays float64 (HF's built-in loss always uses float32).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


class AsFTModule(L.LightningModule):
    """LoRA fine-tuning with the AsFT regulariser that anchors updates to the alignment direction.

    Example::

        asft fit --config configs/tiny.yaml

    Args:
        model: causal LM to fine-tune: a local Hugging Face directory, a hub id, or a ``.gguf`` file.
        direction: alignment-direction file from ``asft direction`` (required when ``lam > 0``).
        lam: weight of the AsFT penalty; ``0`` is plain LoRA SFT (the paper's useful range is 0.1 to 10).
        anchor: the penalty's main term per module, ``dW = B A``: ``projector`` ``||(I - C) dW||_F^2`` with the
            direction file's ``C`` (the published AsFT); ``normalized`` the same with ``C`` divided by its top
            eigenvalue (``V V^T / sigma_1^2``: ``lam`` means the same whatever ``||V||_F``); ``harm_subspace``
            ``||U_k U_k^T dW||_F^2`` for a basis from ``asft direction --reference harmful --projector subspace``
            (keeps the update out of the harmful fine-tune's subspace); ``inside`` the same term for a basis of
            the alignment direction (``--reference base --projector subspace``: keeps the update out of the
            subspace the alignment wrote into); ``none`` (only the sign terms). ``projector``, ``normalized`` and
            ``inside`` need a ``--reference base`` file, ``harm_subspace`` a ``harmful`` one.
        gguf_file: GGUF file name inside ``model`` when ``model`` is a directory.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale ``alpha / r``).
        lora_dropout: dropout on the LoRA input.
        target_modules: modules to adapt: a list of name suffixes, or one regular expression (PEFT semantics).
        include_lora_scale: penalise ``(alpha / r) * B A`` instead of ``B A`` (the published code omits the scale).
        sign_weight: weight of this project's sign-aware extension ``relu(-<B A, V>_F / ||V||_F)^2`` per module,
            added to the AsFT penalty (penalises updates that move against the alignment direction, which the
            orthogonal penalty cannot see); needs a direction file with the full ``V``. ``0``: the published AsFT.
        component_weight: weight of this project's per-component sign term ``sum_i relu(-u_i^T B A v_i)^2`` over
            ``V``'s top-k singular components (no motion against any of them, not only against ``V`` as a whole);
            needs a low-rank direction file (``asft direction --rank k``). ``0``: off.
        adapter: an existing PEFT adapter directory to continue from (trainable) instead of a fresh LoRA.
        learning_rate: AdamW learning rate when ``optimizer`` is not given.
        weight_decay: AdamW weight decay when ``optimizer`` is not given.
        optimizer: optimizer factory (``class_path``/``init_args`` in YAML); default AdamW.
        lr_scheduler: learning-rate scheduler factory, e.g. ``torch.optim.lr_scheduler.StepLR``.
        scheduler_interval: step the scheduler every ``epoch`` or every ``step``.
        dtype: dtype the base model is loaded in.
        direction_dtype: dtype the directions are kept in on the device (default: the LoRA weights' dtype).
        attn_implementation: attention kernel passed to transformers (``eager``, ``sdpa``, ...).
        gradient_checkpointing: enable non-reentrant gradient checkpointing of the base model.
        adapter_output: where to write the PEFT adapter at the end of fit (default ``<log_dir>/adapter``).
        log_module_drift: also log each module's drift ratio (one metric per module).
    """

    def __init__(
        self,
        model: str,
        direction: str | None = None,
        lam: float = 1.0,
        gguf_file: str | None = None,
        lora_r: int = 8,
        lora_alpha: float = 32,
        lora_dropout: float = 0.05,
        target_modules: list[str] | str = ("q_proj", "v_proj"),
        include_lora_scale: bool = False,
        sign_weight: float = 0.0,
        anchor: Anchor = "projector",
        component_weight: float = 0.0,
        adapter: str | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
        direction_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        adapter_output: str | None = None,
        log_module_drift: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        problems = check_strengths(lam, sign_weight, component_weight, anchor)
        if not problems and lam > 0 and direction is None:
            problems.append("lam > 0 needs a direction file (model.direction); set lam: 0 for plain LoRA SFT")
        if lora_r < 1:
            problems.append(f"lora_r must be >= 1, got {lora_r}")
        if not 0.0 <= lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if learning_rate <= 0:
            problems.append(f"learning_rate must be > 0, got {learning_rate}")
        if isinstance(target_modules, (list, tuple)) and not target_modules:
            problems.append("target_modules is empty")
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            problems.append(f"adapter {adapter}: no adapter_config.json; expected a PEFT adapter directory")
        if problems:
            raise ArgumentError("AsFTModule: " + "; ".join(problems))
        self.model_path, self.gguf_file = split_gguf(model, gguf_file)
        self.lam = float(lam)
        self.target_modules = list(target_modules) if not isinstance(target_modules, str) else target_modules
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.directions: DirectionSet | None = None
        if direction is not None:
            self.directions = load_direction(direction)
            local = Path(self.model_path).exists()
            if local:
                fingerprint = architecture_fingerprint(load_model_config(self.model_path, self.gguf_file))
                self.directions.check_model(fingerprint, model)
            check_direction(self.directions, anchor, sign_weight, component_weight)
        self.model: torch.nn.Module | None = None
        self.anchor: LoraAnchor | None = None
        self.strict_loading = False  # checkpoints hold only the trainable (LoRA) weights
        self._last_drift: float | None = None

    # ----------------------------------------------------------------------------------------------- setup
    def configure_model(self) -> None:
        """Load the base model, wrap it with LoRA, and attach the penalty hooks (once)."""
        if self.model is not None:
            return
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        kwargs: dict[str, Any] = {"dtype": DTYPES[hp.dtype]}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        if hp.attn_implementation is not None:
            kwargs["attn_implementation"] = hp.attn_implementation
        strategy = self._trainer.strategy if self._trainer is not None else None
        with hf_zero3_init(strategy):  # ZeRO-3: transformers loads the weights into the partitioned parameters
            base = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
        if hp.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # ZeRO-3: LoRA factors are built whole (PEFT initialises / loads them as usual), deepspeed.initialize
        # partitions them
        with outside_zero_init():
            if hp.adapter is not None:
                peft_model = PeftModel.from_pretrained(base, hp.adapter, is_trainable=True)
            else:
                config = LoraConfig(
                    r=hp.lora_r,
                    lora_alpha=hp.lora_alpha,
                    lora_dropout=hp.lora_dropout,
                    target_modules=self.target_modules,
                    task_type="CAUSAL_LM",
                    bias="none",
                )
                try:
                    peft_model = get_peft_model(base, config)
                except ValueError as err:
                    raise ArgumentError(f"{self.model_path}: target_modules {self.target_modules!r}: {err}") from err
        layers = lora_layers(peft_model)
        if not layers:
            raise ArgumentError(f"{self.model_path}: target_modules {self.target_modules!r} matched no module")
        peft_model.train()  # from_pretrained returns eval mode; LoRA dropout must be active in fit
        self.model = peft_model
        if self.directions is not None:
            self.directions.check_modules(lora_shapes(layers), self.model_path)
            self.anchor = LoraAnchor(
                peft_model,
                self.directions.modules,
                include_lora_scale=hp.include_lora_scale,
                sign_weight=hp.sign_weight,
                direction_dtype=DTYPES[hp.direction_dtype] if hp.direction_dtype else None,
                zero3=zero_stage(strategy) == 3,
                anchor=hp.anchor,
                component_weight=hp.component_weight,
            )

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}

    # ------------------------------------------------------------------------------------------- steps
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits of the adapted model."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _step(self, batch: dict[str, Tensor], with_grad: bool) -> dict[str, Tensor]:
        if self.anchor is not None:
            self.anchor.start(with_grad=with_grad and self.lam > 0)
        try:
            logits = self(batch["input_ids"], batch.get("attention_mask"))
        finally:
            record = self.anchor.stop() if self.anchor is not None else None
        task_loss = causal_lm_loss(logits, batch["labels"])
        out = {"task_loss": task_loss, "loss": task_loss}
        if record is not None and record.penalties:
            penalty = record.total_penalty()
            out["penalty"] = penalty.detach()
            out["drift_ratio"] = record.drift_ratio()
            if self.lam > 0:
                out["loss"] = task_loss + self.lam * penalty.to(task_loss.dtype)
            if self.hparams.log_module_drift:
                out["module_drift"] = record.module_drift()
        return out

    def _log(self, stage: str, out: dict[str, Any], batch_size: int) -> None:
        on_step = stage == "train"
        metrics = {f"{stage}/{k}": v.detach() for k, v in out.items() if isinstance(v, Tensor)}
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)
        for name, value in out.get("module_drift", {}).items():
            self.log(f"{stage}/drift/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._step(batch, with_grad=True)
        loss = out["loss"]
        finite = bool(torch.isfinite(loss.detach()).item())
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            detail = ", ".join(f"{k}={float(v):.6g}" for k, v in out.items() if isinstance(v, Tensor) and v.numel() == 1)
            raise NonFiniteLossError(
                f"non-finite loss at global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) "
                f"on at least one rank: {detail}; lower the learning rate or lam, or check the data"
            )
        if "drift_ratio" in out:
            self._last_drift = float(out["drift_ratio"])
        self._log("train", out, batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log("val", self._step(batch, with_grad=False), batch["input_ids"].shape[0])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log("test", self._step(batch, with_grad=False), batch["input_ids"].shape[0])

    # ------------------------------------------------------------------------------------- checkpoints
    def _trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable (LoRA) weights: the frozen base model is reloaded from ``model``."""
        keys = self._trainable_keys()
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint or self.model is None:
            return
        missing = sorted(self._trainable_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointError(
                f"checkpoint lacks {len(missing)} LoRA weight(s) of this model, e.g. {missing[:3]}: "
                "was it written for another model or target_modules?"
            )

    # -------------------------------------------------------------------------------------- adapter out
    def adapter_dir(self) -> Path:
        """Where the adapter is written at the end of fit."""
        if self.hparams.adapter_output:
            return Path(self.hparams.adapter_output)
        log_dir = self.trainer.log_dir if self.trainer is not None else None
        return Path(log_dir or self.trainer.default_root_dir) / "adapter"

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write the PEFT adapter (loadable by ``PeftModel.from_pretrained``) atomically to ``path``."""
        meta = {
            "base_model": self.model_path,
            "gguf_file": self.gguf_file,
            "lam": self.lam,
            "direction": self.directions.path if self.directions else None,
            "projector": self.directions.metadata["projector"] if self.directions else None,
            "include_lora_scale": self.hparams.include_lora_scale,
            "sign_weight": self.hparams.sign_weight,
            "anchor": self.hparams.anchor,
            "component_weight": self.hparams.component_weight,
            "direction_reference": self.directions.reference if self.directions else None,
            "final_train_drift_ratio": self._last_drift,
            "global_step": self.global_step if self._trainer is not None else None,
        }

        def build(tmp: Path) -> None:
            self.model.save_pretrained(str(tmp))
            (tmp / "asft_meta.json").write_text(json.dumps(meta, indent=2) + "\n")

        return atomic_replace_dir(build, path)

    def on_fit_end(self) -> None:
        target = self.adapter_dir()
        with gathered(self.trainer.strategy, [p for p in self.parameters() if p.requires_grad]):  # ZeRO-3: on all ranks
            if self.trainer.is_global_zero:
                self.save_adapter(target)
        self.trainer.strategy.barrier("asft-save-adapter")
