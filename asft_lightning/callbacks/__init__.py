"""Lightning callbacks of asft-lightning (importable from YAML as ``asft_lightning.callbacks.<Name>``)."""

from asft_lightning.callbacks.monitor import SafetyMonitor
from asft_lightning.callbacks.restoration import CurvatureRestoration

__all__ = ["CurvatureRestoration", "SafetyMonitor"]
