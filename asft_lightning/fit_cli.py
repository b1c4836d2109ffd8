"""``asft fit`` / ``validate`` / ``test``: Lightning's CLI for :class:`~asft_lightning.module.AsFTModule` and
:class:`~asft_lightning.data.AsFTDataModule`.

Kept apart from :mod:`asft_lightning.cli` (the ``asft`` program and its other subcommands) so that a subcommand
that runs a fit itself (``asft harm-direction``) can use it without importing the program that dispatches to it.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

import asft_lightning.strategies  # noqa: F401  (registers the deepspeed_cpu* strategy names)

__all__ = ["AsFTCLI", "lightning_cli"]


class AsFTCLI(LightningCLI):
    """LightningCLI for :class:`~asft_lightning.module.AsFTModule` and :class:`~asft_lightning.data.AsFTDataModule`.

    The data module's tokenizer follows the model (``model.model`` and ``model.gguf_file``) unless set.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.gguf_file", "data.gguf_file")

    def instantiate_trainer(self, **kwargs):
        """The trainer; without a logger given and without TensorBoard installed, the CSV logger Lightning would
        fall back to, named up front (Lightning warns about the fallback on every run otherwise)."""
        import importlib.util

        trainer = self._get(self.config_init, "trainer", default={})
        if trainer.get("logger") in (None, True) and not any(
            importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
        ):
            from lightning.pytorch.loggers import CSVLogger

            kwargs.setdefault("logger", CSVLogger(save_dir=trainer.get("default_root_dir") or os.getcwd()))
        return super().instantiate_trainer(**kwargs)


def lightning_cli(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> AsFTCLI:
    """Run (or only build, with ``run=False``) the Lightning CLI on ``args`` (``None``: the command line).

    ``exit_on_error=False`` raises a bad command line as ``argparse.ArgumentError`` instead of printing the usage
    and exiting.
    """
    from asft_lightning.data import AsFTDataModule
    from asft_lightning.module import AsFTModule

    return AsFTCLI(
        AsFTModule,
        AsFTDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        seed_everything_default=42,
        parser_kwargs={"exit_on_error": exit_on_error},
    )
