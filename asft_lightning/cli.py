"""The ``asft`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` plus ``direction``, ``safelora``, ``demo``.

``demo`` (:mod:`asft_lightning.demo`) runs AsFT against plain LoRA end to end on the offline world and prints HS /
FA; ``fit``, ``validate`` and ``test`` are Lightning's own (``asft fit --help``, ``--print_config``, YAML configs via
``--config``). The other subcommands are plain functions exposed by jsonargparse, so they take the same
``--config`` YAML files and ``--help`` from their docstrings.

Run as a program (:func:`main` without arguments, the console script), ``asft`` prints a user error
(:class:`~asft_lightning.errors.AsftError`, a bad command line, ...) as one line ``asft <command>: error: ...`` and
exits with status 2, exits with 130 on Ctrl-C, and keeps the dependencies' internal notices off the console
(:func:`console`); called from Python with an argument list it lets every exception through.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Literal

from asft_lightning.fit_cli import AsFTCLI, lightning_cli  # noqa: F401 (asft fit's CLI; re-exported here)

EXTRA_COMMANDS = ("direction", "harm-direction", "safelora", "resta", "safemerge", "evaluate", "restore",
                  "prepare-demo", "tiny-world", "demo", "basin")


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
        unaligned: reference checkpoint: the base model before alignment, or a harmful fine-tune of the aligned
            model (``reference: harmful``; then also a PEFT LoRA adapter trained on ``aligned``, e.g. by ``asft fit
            --model.lam 0 --data.harmful_ratio 1`` on attack-style pairs: V = -s B A per adapted module).
        output: the ``.safetensors`` file to write.
        target_modules: module names: list of suffixes, or one regex (PEFT's ``target_modules`` semantics); every
            linear module of a Llama-style model: ``[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]``.
        projector: ``safelora`` (published C = V V^T / ||V||_F) or ``subspace`` (exact orthogonal projector on
            the top-k left singular vectors of V).
        rank: keep k singular vectors (low-rank safelora, or the subspace rank); a low-rank file also keeps the
            matching right singular vectors, which ``model.component_weight`` needs.
        energy: choose k per module as the smallest holding this share of ||V||_F^2.
        dtype: storage dtype of the file.
        aligned_gguf_file: GGUF file inside ``aligned`` if it is a directory.
        unaligned_gguf_file: GGUF file inside ``unaligned`` if it is a directory.
        reference: what ``unaligned`` is (``base`` or ``harmful``); recorded in the metadata, and checked by
            ``asft fit``: ``model.anchor`` projector / normalized / inside need ``base``, harm_subspace ``harmful``.
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


USAGE = (
    "usage: asft [--debug] {fit,validate,test,direction,harm-direction,safelora,resta,safemerge,evaluate,restore,"
    "prepare-demo,tiny-world,demo,basin} ...  (asft SUBCOMMAND --help)"
)
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``asft`` console script.

    Called without ``argv`` it is the program: it reads ``sys.argv``, prints a user error as one line and exits
    with status 2, and exits with 130 on Ctrl-C (:func:`console`). Given ``argv`` (from Python, as the tests do) it
    runs the command and lets every exception through.
    """
    if argv is None:
        sys.exit(console(sys.argv[1:]))
    run(list(argv))


def run(argv: list[str], from_console: bool = False) -> None:
    """Run one ``asft`` command line (without the program name); exceptions propagate."""
    if argv and argv[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        if argv[0] == "evaluate":
            from asft_lightning.evaluate import evaluate as fn
        elif argv[0] == "restore":
            from asft_lightning.restore_command import restore_adapter as fn
        elif argv[0] == "resta":
            from asft_lightning.resta import resta as fn
        elif argv[0] == "harm-direction":
            from asft_lightning.harm_reference import harm_direction as fn
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
        CLI(fn, args=argv[1:], as_positional=False, prog=f"asft {argv[0]}", exit_on_error=not from_console)
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            sys.exit(USER_ERROR_STATUS)
        return
    # From the console LightningCLI reads the command line itself, as it is meant to (sys.argv is this argv).
    lightning_cli(None if from_console else argv, exit_on_error=not from_console)


def console(argv: list[str]) -> int:
    """Run ``asft`` as a program; returns its exit status.

    * A user error (:class:`~asft_lightning.errors.AsftError`, a bad command line or config file, Lightning's
      ``MisconfigurationException``, an ``OSError`` on a named path) prints ``asft <command>: error: <message>`` as
      one line on stderr: status 2. ``--debug`` anywhere on the line, or ``ASFT_DEBUG=1``, prints its traceback
      first, and Lightning's info lines (seed, devices), which are otherwise held back.
    * Ctrl-C: status 130 (every output is written atomically, so nothing half-written is left).
    * Any other exception is a bug: its traceback, as Python prints it.
    """
    debug = "--debug" in argv or os.environ.get("ASFT_DEBUG", "").lower() not in ("", "0", "false")
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["ASFT_DEBUG"] = "1"  # processes that Lightning starts for other ranks re-run this command line
    sys.argv[1:] = argv
    command = next((a for a in argv if a in ("fit", "validate", "test", *EXTRA_COMMANDS)), None)
    prog = f"asft {command}" if command else "asft"
    _quiet_dependencies(debug)
    interrupted = _record_interrupts()
    try:
        run(argv, from_console=True)
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    except SystemExit:
        if interrupted:  # Lightning turns Ctrl-C during fit into sys.exit(1)
            return INTERRUPTED_STATUS
        raise
    except Exception as err:
        if interrupted:
            return INTERRUPTED_STATUS
        if not _is_user_error(err):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(err, prog)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return 0


def _is_user_error(err: BaseException) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from asft_lightning.errors import AsftError

    if isinstance(err, (AsftError, MisconfigurationException, argparse.ArgumentError)):  # the last: a bad command line
        return True
    return isinstance(err, OSError) and err.filename is not None  # a path the user named: missing, unwritable, ...


def _one_line(err: BaseException, prog: str) -> str:
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return message.removeprefix(f"{prog}: ")


def _record_interrupts() -> list[bool]:
    """Note Ctrl-C (SIGINT) before it turns into an exception; returns a list that is non-empty once it came."""
    seen: list[bool] = []

    def on_sigint(signum: int, frame: object) -> None:
        seen.append(True)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    return seen


def _quiet_dependencies(debug: bool) -> None:
    """Keep the dependencies' internal notices off the console; the user sees progress, phases, results.

    * Lightning's info lines (seed, devices) unless ``debug``: its warnings still show.
    * DeepSpeed (imported by transformers and accelerate whenever it is installed) guesses its accelerator and logs
      a warning when it falls back to the CPU: on a machine without CUDA it is told ``DS_ACCELERATOR=cpu`` up front
      (an explicit setting is kept).
    * Two deprecation warnings between pinned dependencies, which only their authors can act on: peft's
      ``PeftModel`` reads transformers' deprecated ``is_gradient_checkpointing``, Lightning's pytree helper builds
      torch's deprecated ``LeafSpec``.
    * Lightning's advertising tips (``litlogger``, ``litmodels``).
    """
    import logging
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    if not debug:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:"))


if __name__ == "__main__":
    main()
