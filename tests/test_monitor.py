"""SafetyMonitor: drift and penalty against dense float64 formulas, an end-to-end fit writing PNG + JSON with HS
entries a fresh judge reproduces, resume, and bad input refused before training."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from asft_lightning.anchor import lora_layers
from asft_lightning.callbacks import SafetyMonitor
from asft_lightning.callbacks.monitor import lora_drift
from asft_lightning.cli import lightning_cli
from asft_lightning.direction import DirectionError, extract_direction, load_direction
from asft_lightning.metrics import KeywordJudge

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS, EVERY, PROBE_EVERY, PROBE_SIZE = 6, 2, 3, 6


def _dense_c(md) -> torch.Tensor:
    """The projector ``C`` as a dense float64 ``d_out x d_out`` matrix, in whichever form the file stores it."""
    if md.basis is not None:
        u = md.basis.double()
        w = md.weights.double() if md.weights is not None else torch.ones(u.shape[1], dtype=torch.float64)
        return u @ torch.diag(w) @ u.T
    v = md.direction.double()
    return v @ v.T / md.norm.double()  # the file's ||V||_F, as the regulariser uses it


def _dense(a: torch.Tensor, b: torch.Tensor, md) -> tuple[float, float]:
    """``(drift ratio, ||(I - C) B A||_F^2)`` from the dense float64 update ``B A``."""
    dw = b.detach().double() @ a.detach().double()
    residual = (torch.eye(dw.shape[0], dtype=torch.float64) - _dense_c(md)) @ dw
    return float(torch.linalg.norm(residual) / torch.linalg.norm(dw)), float(residual.square().sum())


def _metric_rows(root: Path) -> list[dict[str, str]]:
    (metrics,) = root.rglob("metrics.csv")
    return list(csv.DictReader(metrics.open()))


def _metric_at(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# ------------------------------------------------------------------------------------------------ unit level


@pytest.mark.parametrize(
    "form",
    [{}, {"rank": 3}, {"projector": "subspace", "rank": 4}],
    ids=["safelora_full", "safelora_rank3", "subspace_rank4"],
)
def test_lora_drift_equals_the_dense_formula(tiny_world, tmp_path, form):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path / "dir.safetensors"
    directions = extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(path), **form).modules
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    layers = lora_layers(model)
    got64 = lora_drift(layers, directions, torch.float64)
    got32 = lora_drift(layers, directions, torch.float32, include_lora_scale=True)
    assert set(got64) == set(directions) == set(layers)
    for name, md in directions.items():
        a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        drift, penalty = _dense(a, b, md)
        assert got64[name]["drift_ratio"] == pytest.approx(drift, rel=1e-10)
        assert got64[name]["penalty"] == pytest.approx(penalty, rel=1e-10)
        assert got64[name]["update_norm"] == pytest.approx(2.0 * float(torch.linalg.norm(b.detach().double() @ a.detach().double())))
        assert got32[name]["drift_ratio"] == pytest.approx(drift, rel=1e-4)
        assert got32[name]["penalty"] == pytest.approx(4.0 * penalty, rel=1e-4)  # scale (alpha / r)^2 = 4
    # a zero update has drift 0, not nan
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert all(v["drift_ratio"] == 0.0 and v["penalty"] == 0.0 for v in lora_drift(layers, directions).values())


# ------------------------------------------------------------------------------------------------ end to end


def _fit_args(world, direction, out: Path, steps: int = STEPS, extra=()) -> list[str]:
    return [
        "fit",
        f"--config={REPO / 'configs' / 'tiny.yaml'}",
        f"--model.model={world['aligned']}",
        f"--model.direction={direction}",
        "--model.lam=1.0",
        f"--model.adapter_output={out / 'adapter'}",
        f"--data.task_data={world['task']}",
        f"--data.harmful_data={world['harmful']}",
        "--data.n=64",
        "--data.val_size=8",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=1.0",
        "--trainer.log_every_n_steps=50",  # the monitor's values must not depend on it
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=asft_lightning.callbacks.SafetyMonitor",
        f"--trainer.callbacks.probe_data={world['harmful']}",
        f"--trainer.callbacks.probe_size={PROBE_SIZE}",
        f"--trainer.callbacks.every_n_steps={EVERY}",
        f"--trainer.callbacks.probe_every_n_steps={PROBE_EVERY}",
        "--trainer.callbacks.max_new_tokens=4",
        "--trainer.callbacks.batch_size=4",
        "--trainer.callbacks.case_sensitive=false",
        "--trainer.callbacks.dtype=float64",
        *extra,
    ]


@pytest.fixture(scope="module")
def monitored(tiny_world, tiny_direction, tmp_path_factory):
    """One AsFT fit of the tiny world with a SafetyMonitor (direction reused from the module)."""
    out = tmp_path_factory.mktemp("monitored")
    cli = lightning_cli(_fit_args(tiny_world, tiny_direction, out))
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SafetyMonitor))
    return cli, monitor, out


def test_logged_drift_and_penalty_equal_dense_reference_from_the_saved_adapter(monitored, tiny_direction):
    cli, monitor, out = monitored
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    directions = load_direction(tiny_direction).modules
    rows = _metric_rows(out)
    (last,) = [e for e in json.loads(next(out.rglob("safety_monitor.json")).read_text())["drift"] if e["step"] == STEPS]
    residual = energy = 0.0
    for name, md in directions.items():
        a = weights[f"base_model.model.{name}.lora_A.weight"]
        b = weights[f"base_model.model.{name}.lora_B.weight"]
        drift, penalty = _dense(a, b, md)
        residual += penalty
        energy += float((b.double() @ a.double()).square().sum())
        assert drift > 0, "the fit did not move this module"
        logged_drift = _metric_at(rows, f"monitor/drift/{name}")
        logged_penalty = _metric_at(rows, f"monitor/penalty/{name}")
        assert sorted(logged_drift) == list(range(0, STEPS + 1, EVERY))
        assert logged_drift[0] == 0.0  # a fresh LoRA (B = 0) has not moved
        assert logged_drift[STEPS] == pytest.approx(drift, rel=1e-9)
        assert logged_penalty[STEPS] == pytest.approx(penalty, rel=1e-9)
        assert last["modules"][name]["drift_ratio"] == pytest.approx(drift, rel=1e-9)
    assert _metric_at(rows, "monitor/drift_ratio")[STEPS] == pytest.approx((residual / energy) ** 0.5, rel=1e-9)
    assert _metric_at(rows, "monitor/penalty")[STEPS] == pytest.approx(residual, rel=1e-9)


def test_fit_writes_png_and_json_with_hs_at_the_probe_steps(monitored, tiny_world):
    cli, monitor, out = monitored
    log_dir = Path(cli.trainer.log_dir)
    png = log_dir / "safety_monitor.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not list(log_dir.glob(".*.tmp")), "a temporary file was left behind"
    report = json.loads((log_dir / "safety_monitor.json").read_text())
    assert report["format_version"] == 1
    assert report["settings"]["direction"] == cli.model.directions.path  # reused from the AsFTModule
    assert report["settings"]["judge"]["judge"] == "keyword"
    entries = report["harmful_score"]
    assert [e["step"] for e in entries] == list(range(0, STEPS + 1, PROBE_EVERY))
    assert [e["step"] for e in report["drift"]] == list(range(0, STEPS + 1, EVERY))
    judge = KeywordJudge(case_sensitive=False)
    prompts = [json.loads(line)["prompt"] for line in Path(tiny_world["harmful"]).read_text().splitlines()]
    for entry in entries:
        gens = entry["generations"]
        assert [g["row"] for g in gens] == list(range(PROBE_SIZE))
        assert [g["prompt"] for g in gens] == prompts[:PROBE_SIZE]
        verdicts = judge([g["prompt"] for g in gens], [g["generation"] for g in gens])
        assert [g["harmful"] for g in gens] == verdicts
        assert 0.0 <= entry["harmful_score"] <= 100.0
        assert entry["harmful_score"] == pytest.approx(100.0 * sum(verdicts) / PROBE_SIZE, abs=1e-9)
        assert entry["total"] == PROBE_SIZE and entry["harmful"] == sum(verdicts)
    logged = _metric_at(_metric_rows(out), "monitor/harmful_score")
    assert logged == {e["step"]: pytest.approx(e["harmful_score"]) for e in entries}
    # the aligned model refuses before training (the tiny world is aligned to refuse)
    assert entries[0]["harmful_score"] < 100.0
    # the model is back in training mode after each probe, and the history is what the callback saves
    assert monitor.state_dict()["harmful_score"] == entries
    fresh = SafetyMonitor()
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.hs_history == entries and fresh.drift_history == report["drift"]


def test_resume_continues_the_history(tiny_world, tiny_direction, tmp_path):
    first = tmp_path / "first"
    extra = ("--trainer.enable_checkpointing=true",)
    lightning_cli(_fit_args(tiny_world, tiny_direction, first, steps=PROBE_EVERY, extra=extra))
    (ckpt,) = first.rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("SafetyMonitor")]
    assert [e["step"] for e in saved["harmful_score"]] == [0, PROBE_EVERY]
    second = tmp_path / "second"
    cli = lightning_cli(_fit_args(tiny_world, tiny_direction, second, steps=2 * PROBE_EVERY, extra=extra)
                        + [f"--ckpt_path={ckpt}"])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SafetyMonitor))
    # no second baseline at the resumed step; the restored entries are kept
    assert [e["step"] for e in monitor.hs_history] == [0, PROBE_EVERY, 2 * PROBE_EVERY]
    assert monitor.hs_history[:2] == saved["harmful_score"]
    assert [e["step"] for e in monitor.drift_history] == [0, 2, 4, 6]


# ------------------------------------------------------------------------------------------------ bad input


def test_argument_ranges():
    with pytest.raises(ValueError, match=r"probe_size must be an integer >= 1, got 0"):
        SafetyMonitor(probe_size=0)
    with pytest.raises(ValueError, match=r"every_n_steps must be an integer >= 1, got 0"):
        SafetyMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match=r"probe_every_n_steps must be an integer >= 1, got -1"):
        SafetyMonitor(probe_every_n_steps=-1)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer in \[1, 4096\], got 0"):
        SafetyMonitor(max_new_tokens=0)
    with pytest.raises(ValueError, match="plot_name must be a file name ending in .png"):
        SafetyMonitor(plot_name="plots/monitor.jpg")
    with pytest.raises(ValueError, match="dtype must be one of"):
        SafetyMonitor(dtype="bfloat16")
    with pytest.raises(ValueError, match="missing.safetensors: direction file not found"):
        SafetyMonitor(direction="missing.safetensors")
    from asft_lightning.metrics import JudgeError

    with pytest.raises(JudgeError, match="no_such_judge"):
        SafetyMonitor(judge="no_such_judge")


def _trainer(tmp_path, monitor) -> L.Trainer:
    return L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=[monitor])


def _module_and_data(world, direction=None):
    from asft_lightning.data import AsFTDataModule
    from asft_lightning.module import AsFTModule

    module = AsFTModule(model=world["aligned"], direction=direction, lam=0.0)
    data = AsFTDataModule(tokenizer=world["aligned"], task_data=world["task"], n=16, harmful_ratio=0.0, val_size=0)
    return module, data


def test_missing_probe_file_is_named_before_the_model_loads(tiny_world, tiny_direction, tmp_path):
    missing = tmp_path / "no_such_probe.jsonl"
    module, data = _module_and_data(tiny_world, tiny_direction)
    with pytest.raises(FileNotFoundError, match="probe_data=.*no_such_probe.jsonl"):
        _trainer(tmp_path, SafetyMonitor(probe_data=str(missing))).fit(module, data)
    assert module.model is None, "the model was loaded before the probe file was checked"
    # a probe file without the prompt column names the column and its argument
    with pytest.raises(ValueError, match="column 'question' .*prompt_column"):
        _trainer(tmp_path, SafetyMonitor(probe_data=tiny_world["harmful"], prompt_column="question")).fit(module, data)


def test_direction_for_other_modules_names_the_module(tiny_world, tmp_path):
    k_only = tmp_path / "k.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(k_only), target_modules=["k_proj"])
    module, data = _module_and_data(tiny_world)
    monitor = SafetyMonitor(direction=str(k_only))
    with pytest.raises(DirectionError, match=r"k\.safetensors: module model\.layers\.0\.self_attn\.k_proj has a direction"):
        _trainer(tmp_path, monitor).fit(module, data)
    assert module.global_step == 0


def test_nothing_to_monitor(tiny_world, tmp_path):
    module, data = _module_and_data(tiny_world)
    with pytest.raises(ValueError, match="nothing to monitor"):
        _trainer(tmp_path, SafetyMonitor()).fit(module, data)


class _PlainModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_a_peft_model(tiny_direction, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(TypeError, match=r"_PlainModule.model to be a peft.PeftModel .*got Linear"):
        _trainer(tmp_path, SafetyMonitor(direction=tiny_direction)).fit(_PlainModule(), loader)


def _asft(args: list[str], cwd: Path, timeout: int = 400) -> None:
    """Run the ``asft`` console script on 2 CPU processes (Lightning re-launches it for rank 1), one thread each."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),  # deepspeed_cpu* compiles nothing
    }
    env.pop("MASTER_PORT", None)
    exe = Path(sys.executable).with_name("asft")
    proc = subprocess.run([str(exe), *args, "--trainer.devices=2"], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _assert_last_drift_is_the_adapters(report: dict, adapter: Path, direction: str, step: int) -> None:
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    last = report["drift"][-1]
    assert last["step"] == step
    for name, md in load_direction(direction).modules.items():
        a = weights[f"base_model.model.{name}.lora_A.weight"]
        b = weights[f"base_model.model.{name}.lora_B.weight"]
        assert last["modules"][name]["drift_ratio"] == pytest.approx(_dense(a, b, md)[0], rel=1e-9)


@pytest.mark.slow
def test_ddp_two_processes_shard_the_probe_and_write_once(monitored, tiny_world, tiny_direction, tmp_path):
    """2 CPU processes (gloo): each answers its share of an odd-sized probe set; HS and generations are gathered."""
    size = PROBE_SIZE - 1  # 5 prompts: 3 on rank 0, 2 on rank 1
    args = _fit_args(tiny_world, tiny_direction, tmp_path, steps=4)
    _asft(args + ["--trainer.strategy=ddp", f"--trainer.callbacks.probe_size={size}"], tmp_path)
    (history,) = tmp_path.rglob("safety_monitor.json")
    (png,) = tmp_path.rglob("safety_monitor.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(history.read_text())
    entries = report["harmful_score"]
    assert [e["step"] for e in entries] == [0, 3, 4]  # every 3 steps, and the last step
    judge = KeywordJudge(case_sensitive=False)
    for entry in entries:
        gens = entry["generations"]
        assert [g["row"] for g in gens] == list(range(size)) and entry["total"] == size
        verdicts = judge([g["prompt"] for g in gens], [g["generation"] for g in gens])
        assert [g["harmful"] for g in gens] == verdicts and entry["harmful"] == sum(verdicts)
        assert entry["harmful_score"] == pytest.approx(100.0 * sum(verdicts) / size, abs=1e-9)
    # before training both runs hold the same model: the sharded probe answers as the single-process one did
    _, single, _ = monitored
    assert entries[0]["generations"] == single.hs_history[0]["generations"][:size]
    _assert_last_drift_is_the_adapters(report, tmp_path / "adapter", tiny_direction, step=4)


@pytest.mark.slow
def test_zero3_drift_from_gathered_lora_factors(tiny_world, tiny_direction, tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes: the partitioned LoRA factors are gathered for the drift (no probe)."""
    args = [a for a in _fit_args(tiny_world, tiny_direction, tmp_path, steps=4) if "probe_data" not in a]
    _asft(args + ["--trainer.strategy=deepspeed_cpu_stage_3"], tmp_path)
    (history,) = tmp_path.rglob("safety_monitor.json")
    report = json.loads(history.read_text())
    assert report["harmful_score"] == [] and [e["step"] for e in report["drift"]] == [0, 2, 4]
    _assert_last_drift_is_the_adapters(report, tmp_path / "adapter", tiny_direction, step=4)
