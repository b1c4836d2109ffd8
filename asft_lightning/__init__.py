"""asft-lightning: safety-preserving LoRA fine-tuning (AsFT, Safe LoRA, curvature-aware restoration) for Lightning.

Heavy pieces are imported from their modules: ``asft_lightning.module.AsFTModule``,
``asft_lightning.data.AsFTDataModule``, ``asft_lightning.direction.extract_direction``.
"""

from asft_lightning.regularizers import asft_penalty, lowrank_penalty, subspace_penalty

__version__ = "0.1.0"
__all__ = ["__version__", "asft_penalty", "lowrank_penalty", "subspace_penalty"]
