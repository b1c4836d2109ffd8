"""Lightning callbacks of asft-lightning (importable from YAML as ``asft_lightning.callbacks.<Name>``)."""
