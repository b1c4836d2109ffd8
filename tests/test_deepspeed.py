"""DeepSpeed ZeRO-2 / ZeRO-3 fits of the tiny world: parity with one process, consolidated adapter, resume.

The CPU runs start ``asft fit`` in a subprocess, as a user does: ZeRO-3 with ``--config configs/deepspeed/cpu_zero3.yaml``,
ZeRO-2 with ``--trainer.devices=2 --trainer.strategy=deepspeed_cpu_stage_2`` (two processes on gloo, 127.0.0.1;
Lightning's launcher re-runs the ``asft`` command for rank 1). :class:`LossRecorder` (this file, imported by the subprocess through ``PYTHONPATH``) all-gathers every rank's
loss per step. The reference is a plain single-process loop over the same global batches: Lightning's
``DistributedSampler`` (seed 42) gives rank ``r`` the permutation's entries ``r, r + 2, ...``, so step ``i``'s global
batch is the two 4-example micro-batches the ranks see, and the data-parallel gradient is the mean of their
gradients. fp32, LoRA dropout 0, the same starting adapter (non-zero A and B, so initialisation cannot differ).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORLD = 2
MICRO_BATCH = 4
N_TRAIN = 32  # 4 optimizer steps per epoch at a global batch of 8
STEPS_PER_EPOCH = N_TRAIN // (WORLD * MICRO_BATCH)
EPOCHS = 2
LAM = 2.0
LR = 3e-3
# ZeRO-3 through the shipped config (exclude_frozen_parameters) with activation checkpointing (the penalty hooks run
# again in the recomputation, where they must add nothing), ZeRO-2 through the registered strategy name
CPU_ZERO3 = [f"--config={REPO / 'configs' / 'deepspeed' / 'cpu_zero3.yaml'}", "--model.gradient_checkpointing=true"]


class LossRecorder(Callback):
    """Every optimizer step: all ranks' losses (all-gathered) and where each direction tensor lives.

    Rank 0 writes ``{"steps": [{"step", "losses"}], "directions": {"first"|"last": {module: [dtype, device, id]}},
    "lora_dtype"}`` to ``path`` at the end of fit.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[dict] = []
        self.directions: dict[str, dict] = {}

    @staticmethod
    def _placement(pl_module) -> dict[str, list]:
        out = {}
        for name, md in pl_module.anchor._placed.items():
            t = md.direction if md.direction is not None else md.basis
            out[name] = [str(t.dtype), str(t.device), id(t)]
        return out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float().reshape(1)
        losses = trainer.strategy.all_gather(loss).flatten().tolist()
        self.steps.append({"step": trainer.global_step, "losses": losses})
        if pl_module.anchor is not None:
            self.directions.setdefault("first", self._placement(pl_module))
            self.directions["last"] = self._placement(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            lora = next(p for n, p in pl_module.named_parameters() if "lora_A" in n)
            Path(self.path).write_text(
                json.dumps({"steps": self.steps, "directions": self.directions, "lora_dtype": str(lora.dtype)})
            )


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def start_adapter(tiny_world, tmp_path_factory) -> str:
    """A PEFT adapter with random non-zero A and B (so the runs cannot differ by initialisation), dropout 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("start") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def f64_direction(tiny_world, tmp_path_factory) -> str:
    """The tiny world's direction stored in float64: the anchor must move it to the LoRA dtype (float32), once."""
    from asft_lightning.direction import extract_direction

    path = tmp_path_factory.mktemp("dir64") / "direction.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(path), dtype="float64")
    return str(path)


RESTORE_STEPS = 3


def _restoration_args(world) -> list[str]:
    """The restoration callback at the end of fit: 4 harmful and 4 retain batches (2 per rank), 3 steps."""
    return [
        "--trainer.callbacks+=asft_lightning.callbacks.CurvatureRestoration",
        f"--trainer.callbacks.harmful_data={world['harmful']}",
        "--trainer.callbacks.num_harmful=32",
        "--trainer.callbacks.num_retain=32",
        f"--trainer.callbacks.batch_size={MICRO_BATCH * 2}",
        f"--trainer.callbacks.max_steps={RESTORE_STEPS}",
        "--trainer.callbacks.target_margin=0.01",
        "--trainer.callbacks.trust_region=0.02",
        "--trainer.callbacks.hvp_method=auto",
    ]


def _fit_args(world, direction, adapter, out: Path, strategy: list[str], extra=()) -> list[str]:
    return [
        "fit",
        f"--config={REPO / 'configs' / 'tiny.yaml'}",
        *strategy,
        f"--model.model={world['aligned']}",
        f"--model.direction={direction}",
        f"--model.lam={LAM}",
        f"--model.adapter={adapter}",
        f"--model.learning_rate={LR}",
        f"--model.adapter_output={out / 'adapter'}",
        f"--data.task_data={world['task']}",
        f"--data.harmful_data={world['harmful']}",
        f"--data.n={N_TRAIN}",
        "--data.val_size=0",
        f"--data.batch_size={MICRO_BATCH}",
        "--trainer.max_steps=-1",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.devices={WORLD}",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=test_deepspeed.LossRecorder",
        f"--trainer.callbacks.path={out / 'losses.json'}",
        *extra,
    ]


def _asft(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the ``asft`` console script (Lightning re-launches it for the other ranks), one torch thread a rank."""
    exe = Path(sys.executable).with_name("asft")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MASTER_ADDR": "127.0.0.1",
        # only used if an op must be compiled (deepspeed_cpu* compiles none by default); persistent, git-ignored
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    }
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def _step_losses(path: Path) -> list[float]:
    """Per optimizer step, the mean of the ranks' losses (the loss whose gradient the step applies)."""
    steps = json.loads(path.read_text())["steps"]
    return [sum(s["losses"]) / len(s["losses"]) for s in steps]


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _reference(world, direction, adapter, world_size: int = WORLD, micro_batch: int = MICRO_BATCH, epochs: int = EPOCHS):
    """Single process, no Lightning, no DeepSpeed: the same global batches, mean of the micro-batch losses, AdamW.

    Returns the per-step losses, the final LoRA weights (adapter-file keys) and the per-step penalties.
    """
    losses, penalties, module, _ = _train_reference(world, direction, adapter, world_size, micro_batch, epochs)
    return losses, _lora_weights(module), penalties


def _lora_weights(module) -> dict[str, torch.Tensor]:
    """The module's LoRA weights under the adapter file's keys."""
    return {
        k.removeprefix("model.").replace(".default", ""): v.detach().clone()
        for k, v in module.state_dict().items()
        if "lora_" in k
    }


def _train_reference(world, direction, adapter, world_size: int = WORLD, micro_batch: int = MICRO_BATCH,
                     epochs: int = EPOCHS, after_epoch=None):  # fmt: skip
    """:func:`_reference`'s loop; returns the losses, penalties, the trained module and its data module."""
    from torch.utils.data import DistributedSampler

    from asft_lightning.data import AsFTDataModule, collate
    from asft_lightning.module import AsFTModule

    data = AsFTDataModule(
        tokenizer=world["aligned"], task_data=world["task"], harmful_data=world["harmful"], n=N_TRAIN,
        harmful_ratio=0.5, val_size=0, max_length=64, batch_size=micro_batch, seed=42,
    )  # fmt: skip
    data.setup("fit")
    module = AsFTModule(model=world["aligned"], direction=direction, lam=LAM, adapter=adapter, learning_rate=LR)
    module.configure_model()
    optimizer = module.configure_optimizers()
    losses, penalties = [], []
    for epoch in range(epochs):
        orders = []
        for rank in range(world_size):
            sampler = DistributedSampler(data.train_dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=42)
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        for step in range(N_TRAIN // (world_size * micro_batch)):
            micro = [order[step * micro_batch : (step + 1) * micro_batch] for order in orders]
            total = 0.0
            for idx in micro:
                out = module._step(collate([data.train_dataset[i] for i in idx], data.pad_token_id), with_grad=True)
                total = total + out["loss"]
            loss = total / world_size
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            penalties.append(float(out["penalty"]))
        if after_epoch is not None:
            after_epoch(epoch, module, data)
    return losses, penalties, module, data


def _restore_reference(callback, module, data):
    """The callback's restoration in one process on all its batches (what the ranks' averaged steps must equal)."""
    from asft_lightning.data import load_samples, sample_batches
    from asft_lightning.restoration import resolve_solver, restore

    tok = data.load_tokenizer()
    harmful = load_samples(callback.harmful_data, "harmful_data", *callback.columns["harmful"],
                           limit=callback.num_harmful)  # fmt: skip
    retain = [s for s in data.train_samples if s.source == "task"][: callback.num_retain]

    def batches(samples):
        return sample_batches(tok, samples, callback.batch_size, data.max_length, data.template, data.system_prompt)

    # the ranks average their steps (solver auto -> cg); this process must run the same solver
    config = resolve_solver(callback._config_run, distributed=True)
    return restore(module.model, batches(harmful), batches(retain), config=config)


def _penalty_of(world, direction, adapter: Path) -> float:
    """The adapter's AsFT penalty sum_l ||(I - C_l) B_l A_l||^2, computed in this process without any engine."""
    from asft_lightning.module import AsFTModule

    module = AsFTModule(model=world["aligned"], direction=direction, lam=LAM, adapter=str(adapter))
    module.configure_model()
    module.anchor.start(with_grad=False)
    with torch.no_grad():
        module(torch.tensor([[1, 2, 3]]))
    return float(module.anchor.stop().total_penalty())


@pytest.fixture(scope="module")
def reference(tiny_world, f64_direction, start_adapter):
    losses, weights, penalties = _reference(tiny_world, f64_direction, start_adapter)
    # the penalty is a large part of the loss (so a wrong or missing penalty gradient cannot hide in the tolerance)
    assert LAM * penalties[0] > 0.3 * losses[0], (penalties, losses)
    return losses, weights


def _restored_reference(world, direction, adapter, every_n_epochs: int | None, hvp_method: str):
    """:func:`_reference` with the restoration callback's runs: after every ``every_n_epochs``-th epoch but the last,
    and at the end. Returns the per-step losses, the final weights and each run's harmful-loss trajectory."""
    from asft_lightning.callbacks import CurvatureRestoration

    callback = CurvatureRestoration(
        harmful_data=world["harmful"], num_harmful=32, num_retain=32, batch_size=MICRO_BATCH * 2,
        max_steps=RESTORE_STEPS, trust_region=0.02, target_margin=0.01, hvp_method=hvp_method,
    )  # fmt: skip
    runs = []

    def after_epoch(epoch, module, data):
        if epoch == EPOCHS - 1 or (every_n_epochs and (epoch + 1) % every_n_epochs == 0):
            result = _restore_reference(callback, module, data)
            runs.append([r.harmful_loss for r in result.records])

    losses, _, module, _ = _train_reference(world, direction, adapter, after_epoch=after_epoch)
    assert all(runs), runs  # each run took at least one step
    return losses, _lora_weights(module), runs


def _assert_restorations_match(out: Path, runs: list[list[float]]) -> None:
    """The restoration report of the run matches the single-process runs (same trajectories of the harmful loss)."""
    history = json.loads((out / "restoration.json").read_text())
    assert len(history) == len(runs)
    for entry, expected in zip(history, runs, strict=True):
        got = [r["harmful_loss"] for r in entry["records"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=0)
        assert entry["final_harmful_loss"] > entry["initial_harmful_loss"] + 0.05


def _assert_matches_reference(out: Path, reference, rtol_loss: float, atol_w: float) -> None:
    ref_losses, ref_weights = reference
    losses = _step_losses(out / "losses.json")
    assert len(losses) == len(ref_losses) == EPOCHS * STEPS_PER_EPOCH
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol_loss, atol=0)
    got = _adapter_weights(out / "adapter")
    assert got.keys() == ref_weights.keys()
    for key, value in ref_weights.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol_w, msg=key)
    # the LoRA weights moved (the comparison is not trivially between two copies of the start)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_zero3_matches_single_process_and_resumes(tiny_world, f64_direction, start_adapter, reference, tmp_path):
    ckpt_cb = [
        "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks.filename={epoch}",
        "--trainer.callbacks.save_top_k=-1",
    ]
    full = tmp_path / "full"
    _asft(_fit_args(tiny_world, f64_direction, start_adapter, full, CPU_ZERO3, ckpt_cb), tmp_path)
    _assert_matches_reference(full, reference, rtol_loss=1e-5, atol_w=1e-6)

    # directions: moved once to the LoRA weights' dtype/device (float64 file -> float32), never re-placed
    record = json.loads((full / "losses.json").read_text())
    assert record["lora_dtype"] == "torch.float32"
    assert record["directions"]["first"] == record["directions"]["last"]
    assert {tuple(v[:2]) for v in record["directions"]["first"].values()} == {("torch.float32", "cpu")}

    # the consolidated adapter loads with PEFT and gives the trained update
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), str(full / "adapter"))
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert got and all(v.ndim == 2 and v.numel() > 0 for v in got.values())
    for key, value in _adapter_weights(full / "adapter").items():
        torch.testing.assert_close(got[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)

    # validate under ZeRO-3 (Lightning's DeepSpeed inference setup clears module hooks; the anchor re-attaches)
    val = tmp_path / "val"
    _asft(
        [
            "validate",
            f"--config={REPO / 'configs' / 'tiny.yaml'}",
            f"--model.model={tiny_world['aligned']}",
            f"--model.direction={f64_direction}",
            f"--model.lam={LAM}",
            f"--model.adapter={full / 'adapter'}",
            f"--data.task_data={tiny_world['task']}",
            f"--data.harmful_data={tiny_world['harmful']}",
            f"--data.n={N_TRAIN}",
            "--data.val_size=16",
            f"--trainer.devices={WORLD}",
            "--trainer.strategy=deepspeed_cpu_stage_3",
            f"--trainer.default_root_dir={val}",
            "--trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    (metrics_file,) = val.rglob("metrics.csv")
    (row,) = [r for r in csv.DictReader(metrics_file.open()) if r.get("val/penalty")]
    expected = _penalty_of(tiny_world, f64_direction, full / "adapter")
    torch.testing.assert_close(float(row["val/penalty"]), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(float(row["val/loss"]) - float(row["val/task_loss"]), LAM * expected, rtol=1e-4, atol=0)

    # resume from the end-of-epoch-0 checkpoint (a DeepSpeed checkpoint directory): the same trajectory
    ckpt = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert ckpt.is_dir(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = sorted(ckpt.rglob("*model_states.pt"))
    assert len(shards) == WORLD
    for shard in shards:  # the frozen base model is not in the checkpoint (it is reloaded from model.model)
        state = torch.load(shard, map_location="cpu", weights_only=False)
        assert not state.get("frozen_param_fragments"), shard
        assert all("lora_" in k for k in state["module"]), [k for k in state["module"] if "lora_" not in k][:3]
    resumed = tmp_path / "resumed"
    _asft(
        _fit_args(tiny_world, f64_direction, start_adapter, resumed, CPU_ZERO3) + [f"--ckpt_path={ckpt}"],
        tmp_path,
    )
    full_losses = _step_losses(full / "losses.json")
    resumed_losses = _step_losses(resumed / "losses.json")
    assert len(resumed_losses) == STEPS_PER_EPOCH
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses[STEPS_PER_EPOCH:]), rtol=1e-6, atol=0)
    final = _adapter_weights(full / "adapter")
    for key, value in _adapter_weights(resumed / "adapter").items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.slow
def test_zero2_matches_single_process(tiny_world, f64_direction, start_adapter, reference, tmp_path):
    out = tmp_path / "z2"
    _asft(_fit_args(tiny_world, f64_direction, start_adapter, out, ["--trainer.strategy=deepspeed_cpu_stage_2"]), tmp_path)
    _assert_matches_reference(out, reference, rtol_loss=1e-5, atol_w=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "every_n_epochs", "reference_hvp"),
    [("deepspeed_cpu_stage_2", None, "auto"), ("deepspeed_cpu_stage_3", 1, "finite_difference")],
    ids=["zero2-end", "zero3-every-epoch"],
)
def test_restoration_under_zero_matches_single_process(
    strategy, every_n_epochs, reference_hvp, tiny_world, f64_direction, start_adapter, tmp_path
):
    """CurvatureRestoration inside a 2-process ZeRO fit: ranks average losses, gradients and HVPs, so the restored
    adapter equals one process restoring on all batches. Under ZeRO-3 ``hvp_method=auto`` becomes finite differences,
    and the run after epoch 0 must reach the optimizer's float32 masters (else epoch 1 would start from the
    un-restored weights and its losses would differ)."""
    out = tmp_path / "run"
    extra = _restoration_args(tiny_world)
    if every_n_epochs:
        extra.append(f"--trainer.callbacks.every_n_epochs={every_n_epochs}")
    _asft(_fit_args(tiny_world, f64_direction, start_adapter, out, [f"--trainer.strategy={strategy}"], extra), tmp_path)
    losses, weights, runs = _restored_reference(tiny_world, f64_direction, start_adapter, every_n_epochs, reference_hvp)
    assert len(runs) == (2 if every_n_epochs else 1)
    _assert_restorations_match(out, runs)
    _assert_matches_reference(out, (losses, weights), rtol_loss=1e-5, atol_w=1e-5)
    # the restoration changed the adapter (the comparison is not between two un-restored copies)
    trained = _reference(tiny_world, f64_direction, start_adapter)[1] if not every_n_epochs else None
    if trained is not None:
        moved = sum(float((weights[k] - trained[k]).norm() ** 2) for k in weights) ** 0.5
        assert moved > 1e-2, moved


def test_restoration_on_one_zero3_device_runs_the_fisher_solver(tiny_world, f64_direction, start_adapter, tmp_path):
    """The callback's default solver (auto) on one device under ZeRO-3 is the Fisher (no all-reduce), and it restores
    through the engine-owned LoRA parameters: the harmful loss reaches the reference."""
    out = tmp_path / "run"
    args = _fit_args(tiny_world, f64_direction, start_adapter, out, ["--trainer.strategy=deepspeed_cpu_stage_3"],
                     _restoration_args(tiny_world))
    _asft([a if not a.startswith("--trainer.devices=") else "--trainer.devices=1" for a in args], tmp_path)
    (run,) = json.loads((out / "restoration.json").read_text())
    assert run["config"]["solver"] == "fisher" and run["records"]
    assert run["restored"] and run["final_harmful_loss"] >= run["reference_harmful_loss"] - run["config"]["target_margin"]


def test_restoration_zero3_refuses_exact_hvp(tmp_path):
    from lightning.pytorch.accelerators import CPUAccelerator

    from asft_lightning.callbacks import CurvatureRestoration
    from asft_lightning.strategies import DeepSpeedCPUStrategy

    class _Trainer:
        strategy = DeepSpeedCPUStrategy(stage=3, accelerator=CPUAccelerator())
        world_size = 2
        datamodule = None

    callback = CurvatureRestoration(harmful_data="h.jsonl", hvp_method="double_backward")
    with pytest.raises(ValueError, match="not supported under DeepSpeed ZeRO stage 3.*finite_difference"):
        callback.setup(_Trainer(), None, "fit")
    harmful = tmp_path / "h.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(24)))
    callback = CurvatureRestoration(harmful_data=str(harmful), num_harmful=24, batch_size=8)
    with pytest.raises(ValueError, match=r"harmful_data gives 24 row\(s\).*3 batch\(es\) of batch_size=8.*2 processes"):
        callback.setup(_Trainer(), None, "fit")


def test_cpu_strategy_is_registered_and_refuses_other_accelerators():
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision
    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from asft_lightning.strategies import DeepSpeedCPUStrategy, zero_stage

    for name, stage in (("deepspeed_cpu", 2), ("deepspeed_cpu_stage_2", 2), ("deepspeed_cpu_stage_3", 3)):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, DeepSpeedCPUStrategy)
        assert zero_stage(strategy) == stage
        assert strategy.root_device == torch.device("cpu")
    strategy = DeepSpeedCPUStrategy(stage=3, accelerator=CUDAAccelerator())
    with pytest.raises(MisconfigurationException, match="accelerator=cpu"):
        strategy.setup_environment()
    fp16 = DeepSpeedCPUStrategy(stage=3, accelerator=CPUAccelerator(), precision_plugin=DeepSpeedPrecision("16-mixed"))
    with pytest.raises(MisconfigurationException, match="no fp16.*32-true"):
        fp16.setup_environment()


def test_penalty_with_activation_checkpointing_matches_without(tiny_world, tiny_direction, start_adapter):
    """The penalty hooks run again in checkpointing's recomputation; they must add nothing there (ZeRO-3 at scale
    needs activation checkpointing)."""
    from asft_lightning.module import AsFTModule

    module = AsFTModule(model=tiny_world["aligned"], direction=tiny_direction, lam=LAM, adapter=start_adapter,
                        gradient_checkpointing=True)  # fmt: skip
    module.configure_model()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for checkpointing in (True, False):
        if not checkpointing:
            module.model.base_model.model.gradient_checkpointing_disable()
        module.zero_grad()
        out = module._step(batch, with_grad=True)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((out["loss"].detach(), out["penalty"], grads))
    (loss_gc, pen_gc, grads_gc), (loss, pen, grads) = results
    assert float(pen) > 0
    torch.testing.assert_close(loss_gc, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(pen_gc, pen, rtol=1e-6, atol=0)
    assert grads.keys() == grads_gc.keys() and len(grads) == 8
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _single_device_bf16(world, direction, adapter, out: Path, accelerator: str, strategy: str, cwd: Path) -> None:
    """One device, bf16-mixed, the whole global batch (8) per step, one epoch: compare with the fp32 reference."""
    extra = [
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        "--trainer.precision=bf16-mixed",
        "--trainer.max_epochs=1",
        f"--data.batch_size={WORLD * MICRO_BATCH}",
        "--model.dtype=bfloat16",
    ]
    _asft(_fit_args(world, direction, adapter, out, [f"--trainer.strategy={strategy}"], extra), cwd)
    ref_losses, ref_weights, _ = _reference(world, direction, adapter, world_size=1, micro_batch=WORLD * MICRO_BATCH, epochs=1)
    losses = _step_losses(out / "losses.json")
    assert len(losses) == len(ref_losses) == STEPS_PER_EPOCH
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=3e-2, atol=0)
    # the LoRA update (final - start) agrees with the fp32 one to bf16 accuracy
    start, got = _adapter_weights(Path(adapter)), _adapter_weights(out / "adapter")
    assert got.keys() == ref_weights.keys()
    diff = sum(float(((got[k].float() - start[k]) - (ref_weights[k] - start[k])).norm() ** 2) for k in got) ** 0.5
    update = sum(float((ref_weights[k] - start[k]).norm() ** 2) for k in got) ** 0.5
    assert update > 0 and diff < 0.1 * update, (diff, update)
    # the float64 CPU direction is placed once, in the LoRA weights' dtype (DeepSpeed's bf16 makes ZeRO-2's LoRA
    # weights bf16; under ZeRO-3 PEFT's float32 LoRA factors stay float32) on the LoRA weights' device
    record = json.loads((out / "losses.json").read_text())
    assert record["lora_dtype"] in ("torch.bfloat16", "torch.float32")
    assert record["directions"]["first"] == record["directions"]["last"]
    device = "cuda:0" if accelerator == "gpu" else "cpu"
    assert {tuple(v[:2]) for v in record["directions"]["first"].values()} == {(record["lora_dtype"], device)}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_bf16_zero_matches_fp32_reference(stage, tiny_world, f64_direction, start_adapter, tmp_path):
    """Lightning's own deepspeed_stage_N on one GPU, bf16: the float64 CPU direction is moved to the GPU in bf16 once,
    the loss and LoRA update follow the fp32 single-process reference, the adapter is consolidated."""
    out = tmp_path / f"gpu_z{stage}"
    _single_device_bf16(tiny_world, f64_direction, start_adapter, out, "gpu", f"deepspeed_stage_{stage}", tmp_path)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), str(out / "adapter"))
    assert sum(1 for k in loaded.state_dict() if "lora_" in k) == 8
