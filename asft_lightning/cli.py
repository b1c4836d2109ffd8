"""The ``asft`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` plus ``direction``, ``safelora``, ``demo``.

``demo`` (:mod:`asft_lightning.demo`) runs AsFT against plain LoRA end to end on the offline world and prints HS /
FA; ``fit``, ``validate`` and ``test`` are Lightning's own (``asft fit --help``, ``--print_config``, YAML configs via
``--config``). The other subcommands are plain functions exposed by jsonargparse, so they take the same
``--config`` YAML files and ``--help`` from their docstrings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

from lightning.pytorch.cli import LightningCLI

import asft_lightning.strategies  # noqa: F401  (registers the deepspeed_cpu* strategy names)

EXTRA_COMMANDS = ("direction", "safelora", "resta", "safemerge", "evaluate", "restore", "prepare-demo",
                  "tiny-world", "demo", "basin")


class AsFTCLI(LightningCLI):
    """LightningCLI for :class:`~asft_lightning.module.AsFTModule` and :class:`~asft_lightning.data.AsFTDataModule`.

    The data module's tokenizer follows the model (``model.model`` and ``model.gguf_file``) unless set.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("model.gguf_file", "data.gguf_file")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> AsFTCLI:
    """Run (or only build, with ``run=False``) the Lightning CLI on ``args``."""
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
    )


def direction(
    aligned: str,
    unaligned: str,
    output: str,
    target_modules: list[str] | str = ["q_proj", "v_proj"],  # noqa: B006 (shown in --help)
    projector: Literal["safelora", "subspace"] = "safelora",
    rank: int | None = None,
    energy: float | None = None,
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32",
    aligned_gguf_file: str | None = None,
    unaligned_gguf_file: str | None = None,
    reference: Literal["base", "harmful"] = "base",
    hash_inputs: bool = True,
) -> dict:
    """Compute the alignment direction V = W_aligned - W_unaligned per targeted module and save it.

    Streams tensor by tensor from safetensors shards (GGUF files are dequantised one model at a time).
    Writes ``output`` (safetensors, metadata in its header) and ``output + '.json'``; prints C's spectrum.

    Args:
        aligned: safety-aligned checkpoint: HF directory (safetensors, possibly sharded) or ``.gguf`` file.
        unaligned: reference checkpoint: the base model before alignment, or a harmful fine-tune
            (``reference: harmful``).
        output: the ``.safetensors`` file to write.
        target_modules: module names: list of suffixes, or one regex (PEFT's ``target_modules`` semantics).
        projector: ``safelora`` (published C = V V^T / ||V||_F) or ``subspace`` (exact orthogonal projector on
            the top-k left singular vectors of V).
        rank: keep k singular vectors (low-rank safelora, or the subspace rank).
        energy: choose k per module as the smallest holding this share of ||V||_F^2.
        dtype: storage dtype of the file.
        aligned_gguf_file: GGUF file inside ``aligned`` if it is a directory.
        unaligned_gguf_file: GGUF file inside ``unaligned`` if it is a directory.
        reference: what ``unaligned`` is (``base`` or ``harmful``); recorded in the metadata.
        hash_inputs: record SHA-256 of every input file.
    """
    from asft_lightning.direction import extract_direction, spectrum_summary

    result = extract_direction(
        aligned,
        unaligned,
        output,
        target_modules=target_modules,
        projector=projector,
        rank=rank,
        energy=energy,
        dtype=dtype,
        aligned_gguf_file=aligned_gguf_file,
        unaligned_gguf_file=unaligned_gguf_file,
        reference=reference,
        hash_inputs=hash_inputs,
    )
    summary = {"output": output, "projector": result.metadata["projector"], **spectrum_summary(result)}
    print(json.dumps(summary, indent=2))
    return summary


def safelora(
    adapter: str,
    direction: str,
    output: str,
    num_proj_layers: int | None = 10,
    threshold: float | None = None,
    overwrite: bool = False,
    selection: Literal["published", "strict"] = "published",
) -> dict:
    """Safe LoRA (arXiv 2405.16833): project the least aligned LoRA modules of an adapter onto the alignment subspace.

    Args:
        adapter: PEFT LoRA adapter directory (never modified).
        direction: direction file from ``asft direction`` for the adapter's base model and target modules.
        output: new adapter directory to write (atomically).
        num_proj_layers: project the modules with the lowest cosine, this many (ignored if ``threshold`` is set).
        threshold: instead, project every module whose cosine is at or below (``published``) / below (``strict``)
            this value.
        overwrite: replace ``output`` if it exists.
        selection: ``published`` (the authors' rule: cosines rounded to 5 decimals, ``<=``, every module tied with
            the k-th lowest projected, a zero update has cosine 0) or ``strict`` (``<``, exactly k, zero updates
            skipped).
    """
    from asft_lightning import safelora as sl

    report = sl.safelora(
        adapter=adapter,
        direction=direction,
        output=output,
        num_proj_layers=None if threshold is not None else num_proj_layers,
        threshold=threshold,
        overwrite=overwrite,
        selection=selection,
    )
    projected = [m for m, r in report["modules"].items() if r["projected"]]
    print(json.dumps({"output": output, "projected": len(projected), "modules": len(report["modules"])}, indent=2))
    return report


def tiny_world(root: str = ".cache/asft-tiny", seed: int = 0) -> dict:
    """Build the embedded tiny world (once, cached) and its direction file: everything ``configs/tiny.yaml`` reads.

    A random 2-layer Llama trained to comply with toy harmful requests (``unaligned``), the same model after a
    short refusal fine-tune (``aligned``, three safetensors shards), toy task and harmful data, and
    ``direction.safetensors`` from ``asft direction``. Nothing is downloaded.

    Args:
        root: cache directory.
        seed: seed of the world.
    """
    from asft_lightning.tiny import build_tiny_world

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    world = build_tiny_world(root, seed=seed)
    world["direction"] = str(Path(root) / "direction.safetensors")
    if not Path(world["direction"]).is_file():
        direction(world["aligned"], world["unaligned"], world["direction"])
    print(json.dumps(world, indent=2))
    return world


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``asft`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        if argv[0] == "evaluate":
            from asft_lightning.evaluate import evaluate as fn
        elif argv[0] == "restore":
            from asft_lightning.restore_command import restore_adapter as fn
        elif argv[0] == "resta":
            from asft_lightning.resta import resta as fn
        elif argv[0] == "safemerge":
            from asft_lightning.safemerge import safemerge as fn
        elif argv[0] == "prepare-demo":
            from asft_lightning.world import prepare_demo as fn
        elif argv[0] == "basin":  # nested: asft basin curves | attribute
            from asft_lightning.basin_command import attribute, curves

            fn = [curves, attribute]
        elif argv[0] == "demo":
            from asft_lightning.demo import bare_flags
            from asft_lightning.demo import demo as fn

            argv = argv[:1] + bare_flags(argv[1:])
        else:
            fn = {"direction": direction, "safelora": safelora, "tiny-world": tiny_world}[argv[0]]
        CLI(fn, args=argv[1:], as_positional=False, prog=f"asft {argv[0]}")
        return
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: asft {fit,validate,test,direction,safelora,resta,safemerge,evaluate,restore,prepare-demo,tiny-world,demo,basin} ...  (asft SUBCOMMAND --help)")
        if not argv:
            sys.exit(2)
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()
