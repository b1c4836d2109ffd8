"""DeepSpeed helpers: a CPU-capable DeepSpeed strategy (tests, laptops) and ZeRO-stage queries.

Lightning's ``deepspeed_stage_*`` strategies refuse anything but CUDA. DeepSpeed itself runs on CPU (its ``cpu``
accelerator, ``gloo`` process groups), so :class:`DeepSpeedCPUStrategy` only skips Lightning's CUDA checks: it sets
up the environment as DDP does, keeps ``root_device`` on the CPU and initialises DeepSpeed's process group without
the CUDA device-index check. Everything else (ZeRO partitioning, the engine, the sharded checkpoint directory) is
Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy`, so a config that runs with
``deepspeed_cpu_stage_3`` on a laptop runs with ``deepspeed_stage_3`` on GPUs.

Registered names (importing this module, which ``asft`` does, registers them)::

    deepspeed_cpu            ZeRO stage 2 (DeepSpeed's default)
    deepspeed_cpu_stage_1    optimizer-state partitioning
    deepspeed_cpu_stage_2    + gradient partitioning
    deepspeed_cpu_stage_3    + parameter partitioning

Example::

    asft fit --config configs/tiny.yaml --trainer.devices=2 --trainer.strategy=deepspeed_cpu_stage_3

DeepSpeed's CPU accelerator builds a shared-memory all-reduce op (``deepspeed_shm_comm``, a C++ extension compiled
on first use: about 80 s on 2 cores) when its communication backend starts. ZeRO training never calls it (it is
DeepSpeed-inference's tensor-parallel all-reduce), so the strategy marks it unavailable by default
(``shm_comm=False``) and nothing is compiled. With ``shm_comm=True`` the op is built once into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

SHM_COMM_OP = "deepspeed_shm_comm"


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    """Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` on CPU processes (``gloo``).

    Takes every argument of ``DeepSpeedStrategy`` (``stage``, ``config``, ...) plus:

    Args:
        shm_comm: let DeepSpeed build and use its shared-memory all-reduce op (compiled on first use; only
            DeepSpeed inference uses it). ``False`` keeps DeepSpeed on plain ``gloo`` and compiles nothing.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, shm_comm: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        self.shm_comm = shm_comm

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def setup_environment(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            raise MisconfigurationException(
                f"{type(self).__name__} (strategy deepspeed_cpu*) runs on CPU processes, but accelerator "
                f"{type(self.accelerator).__name__} was selected: set trainer.accelerator=cpu, or use "
                "trainer.strategy=deepspeed_stage_N on GPUs"
            )
        precision = self.precision_plugin.precision
        if precision in ("16-mixed", "16-true"):
            raise MisconfigurationException(
                f"DeepSpeed on CPU has no fp16 (trainer.precision={precision}): use 32-true, or bf16-mixed if the CPU "
                "supports bfloat16"
            )
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise MisconfigurationException(
                f"DeepSpeed selected its {get_accelerator().device_name()!r} accelerator, but strategy deepspeed_cpu* "
                "needs its CPU accelerator: set the environment variable DS_ACCELERATOR=cpu before starting, or use "
                "trainer.strategy=deepspeed_stage_N on GPUs"
            )
        DDPStrategy.setup_environment(self)  # not DeepSpeedStrategy's, which refuses non-CUDA accelerators

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without _validate_device_index_selection (CPU devices have no index)
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        if not self.shm_comm:
            disable_shm_comm()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # as DeepSpeedStrategy's, but DeepSpeed takes the device rank from args.device_rank, which Lightning sets
        # to root_device.index: None on CPU, which DeepSpeed cannot compare (it wants the local rank)
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        # as DeepSpeedStrategy's (validate / test / predict under DeepSpeed), with the CPU device rank fix above
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                config[key] = self.config[key]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, stage, description in (
            ("deepspeed_cpu", 2, "DeepSpeed ZeRO stage 2 on CPU processes (gloo)"),
            ("deepspeed_cpu_stage_1", 1, "DeepSpeed ZeRO stage 1 on CPU processes (gloo)"),
            ("deepspeed_cpu_stage_2", 2, "DeepSpeed ZeRO stage 2 on CPU processes (gloo)"),
            ("deepspeed_cpu_stage_3", 3, "DeepSpeed ZeRO stage 3 on CPU processes (gloo)"),
        ):
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=description, stage=stage)


@contextmanager
def hf_zero3_init(strategy: Strategy | None) -> Iterator[None]:
    """Tell transformers that a model loaded inside this context is ZeRO-3 partitioned.

    Lightning builds the model (``configure_model``) inside ``deepspeed.zero.Init`` under ZeRO-3, so every parameter is
    partitioned as soon as its module exists. ``from_pretrained`` then loads the weights through
    ``GatheredParameters`` (rank 0 reads the files) and skips its own initialisation of partitioned tensors, but only
    when transformers' DeepSpeed switch (a global weak reference to an ``HfDeepSpeedConfig``) is on; without it the
    load fails on the empty partitions. The switch is on only inside this context, so later models in the same
    process are not affected. Nothing happens without ZeRO-3.
    """
    if zero_stage(strategy) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(strategy.config)  # noqa: F841  (the global switch is a weak reference to it)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


@contextmanager
def outside_zero_init() -> Iterator[None]:
    """Build modules whole inside an active ``deepspeed.zero.Init`` (nothing to do when none is active).

    Under ZeRO-3 a module built inside ``zero.Init`` is partitioned as soon as its ``__init__`` returns, so PEFT's
    LoRA initialisation (``zeros_`` on ``lora_B``) and adapter loading would act on empty partitions. Built here, the
    LoRA factors are ordinary tensors until ``deepspeed.initialize`` partitions them (from rank 0's values).
    """
    if "deepspeed" not in sys.modules:
        yield
        return
    from deepspeed.runtime.zero import partition_parameters as pp

    if pp.top_level_context is None:
        yield
        return
    pp.shutdown_init_context()
    try:
        yield
    finally:
        pp.restore_init_context()


@contextmanager
def gathered(strategy: Strategy | None, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Under ZeRO-3, gather ``params`` whole on every rank (read-only) for the duration; else do nothing.

    Every rank must enter it (it is a collective), e.g. around a rank-0-only ``save_pretrained``.
    """
    if zero_stage(strategy) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def disable_shm_comm() -> None:
    """Mark DeepSpeed's shared-memory communication op unavailable, so starting its backend compiles nothing."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def zero_stage(strategy: Strategy | None) -> int:
    """The DeepSpeed ZeRO stage of a Lightning strategy (``0`` for anything that is not DeepSpeed with ZeRO)."""
    if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy.config, dict):
        return 0
    zero = strategy.config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def _deepspeed_logs_to_stderr() -> None:
    """Send DeepSpeed's log records to stderr instead of stdout (no DeepSpeed import needed).

    DeepSpeed's logger writes to stdout, and it logs as soon as it is imported (its accelerator detection), which
    jsonargparse does while resolving a DeepSpeed strategy's arguments: ``asft fit --print_config`` would print a
    log line before the YAML. A filter on the ``DeepSpeed`` logger hands each record to a stderr handler instead.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d] %(message)s"))

    def to_stderr(record: logging.LogRecord) -> bool:
        handler.handle(record)
        return False

    logging.getLogger("DeepSpeed").addFilter(to_stderr)


DeepSpeedCPUStrategy.register_strategies(StrategyRegistry)
_deepspeed_logs_to_stderr()
