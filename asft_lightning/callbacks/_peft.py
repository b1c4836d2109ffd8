"""What the callbacks need from the LightningModule: its PEFT model."""

from __future__ import annotations

import lightning as L
from torch import nn

from asft_lightning.errors import SetupError


def peft_model_of(pl_module: L.LightningModule, callback: str) -> nn.Module:
    """``pl_module.model`` if it is a ``peft.PeftModel``; else a ``TypeError`` naming ``callback`` and the type found."""
    from peft import PeftModel

    model = getattr(pl_module, "model", None)
    if not isinstance(model, PeftModel):
        raise SetupError(
            f"{callback} needs {type(pl_module).__name__}.model to be a peft.PeftModel (a model wrapped with "
            f"LoRA), got {type(model).__name__}"
        )
    return model
