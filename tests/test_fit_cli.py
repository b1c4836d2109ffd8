"""End-to-end ``asft fit`` / ``validate`` runs on the tiny world: files written, metrics logged, bad input refused."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asft_lightning.cli import lightning_cli
from asft_lightning.direction import DirectionError, extract_direction

REPO = Path(__file__).resolve().parents[1]


def _tree_hash(path: str) -> str:
    digest = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
            digest.update(str(f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def _fit_args(world, direction, out: Path, lam: float, steps: int = 12, extra=()) -> list[str]:
    return [
        "fit",
        f"--config={REPO / 'configs' / 'tiny.yaml'}",
        f"--model.model={world['aligned']}",
        f"--model.direction={direction}",
        f"--model.lam={lam}",
        f"--model.adapter_output={out / 'adapter'}",
        f"--data.task_data={world['task']}",
        f"--data.harmful_data={world['harmful']}",
        "--data.n=120",
        "--data.val_size=16",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=3",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def _last_metric(root: Path, key: str) -> float:
    (metrics,) = root.rglob("metrics.csv")
    values = [row[key] for row in csv.DictReader(metrics.open()) if row.get(key)]
    assert values, f"{key} never logged in {metrics}"
    return float(values[-1])


@pytest.fixture(scope="module")
def subspace_direction(tiny_world, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sub") / "subspace.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(path), projector="subspace", rank=4)
    return str(path)


@pytest.mark.slow
def test_fit_writes_loadable_adapter_and_asft_reduces_drift(tiny_world, subspace_direction, tmp_path):
    before = _tree_hash(tiny_world["aligned"])
    drift = {}
    for lam in (0.0, 10.0):
        out = tmp_path / f"lam{lam}"
        cli = lightning_cli(_fit_args(tiny_world, subspace_direction, out, lam))
        drift[lam] = _last_metric(out, "train/drift_ratio")
        adapter = out / "adapter"
        assert (adapter / "adapter_model.safetensors").is_file()
        assert (adapter / "asft_meta.json").is_file()
        assert _last_metric(out, "val/task_loss") > 0
        # the adapter loads with PEFT and reproduces the trained module's LoRA weights
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
        loaded = PeftModel.from_pretrained(base, str(adapter))
        trained = {k.removeprefix("model."): v for k, v in cli.model.state_dict().items() if "lora_" in k}
        got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
        assert trained.keys() == got.keys()
        for key in trained:
            torch.testing.assert_close(got[key], trained[key])
        assert any(float(v.abs().max()) > 0 for k, v in got.items() if "lora_B" in k)
    assert _tree_hash(tiny_world["aligned"]) == before, "the input checkpoint was modified"
    # with the exact subspace projector, lam > 0 keeps the update in the alignment subspace
    assert drift[10.0] < 0.5 * drift[0.0], drift


@pytest.mark.slow
def test_published_projector_lam_reduces_drift(tiny_world, tiny_direction, tmp_path):
    drift = {}
    for lam in (0.0, 5.0):
        out = tmp_path / f"lam{lam}"
        lightning_cli(_fit_args(tiny_world, tiny_direction, out, lam))
        drift[lam] = _last_metric(out, "train/drift_ratio")
        assert 0 < drift[lam] <= 1
    assert drift[5.0] < drift[0.0], drift


@pytest.mark.slow
def test_checkpoint_holds_only_lora_and_resumes(tiny_world, tiny_direction, tmp_path):
    out = tmp_path / "run"
    extra = ("--trainer.enable_checkpointing=true",)
    lightning_cli(_fit_args(tiny_world, tiny_direction, out, 1.0, steps=4, extra=extra))
    (ckpt,) = out.rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), list(state)[:5]
    resumed = lightning_cli(
        _fit_args(tiny_world, tiny_direction, tmp_path / "resumed", 1.0, steps=6, extra=extra) + [f"--ckpt_path={ckpt}"]
    )
    assert resumed.trainer.global_step == 6


@pytest.mark.slow
def test_validate_existing_adapter(tiny_world, tiny_direction, tmp_path):
    out = tmp_path / "run"
    lightning_cli(_fit_args(tiny_world, tiny_direction, out, 1.0, steps=3))
    cli = lightning_cli(
        [
            "validate",
            f"--config={REPO / 'configs' / 'tiny.yaml'}",
            f"--model.model={tiny_world['aligned']}",
            f"--model.direction={tiny_direction}",
            f"--model.adapter={out / 'adapter'}",
            f"--data.task_data={tiny_world['task']}",
            f"--data.harmful_data={tiny_world['harmful']}",
            "--data.n=120",
            "--data.val_size=16",
            f"--trainer.default_root_dir={tmp_path / 'val'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val/task_loss"]) > 0
    assert float(metrics["val/drift_ratio"]) > 0  # the loaded adapter is not zero


@pytest.mark.slow
def test_console_script_runs_the_tiny_config(tiny_world, tiny_direction, tmp_path):
    exe = Path(sys.executable).with_name("asft")
    assert exe.is_file(), "the asft console script is not installed"
    args = _fit_args(tiny_world, tiny_direction, tmp_path, 1.0, steps=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()


def test_nan_loss_stops_with_step_number(tiny_world, tiny_direction, tmp_path):
    import lightning as L

    from asft_lightning.data import AsFTDataModule
    from asft_lightning.module import AsFTModule

    module = AsFTModule(model=tiny_world["aligned"], direction=tiny_direction, lam=1.0)
    module.configure_model()
    with torch.no_grad():
        next(p for n, p in module.named_parameters() if "lora_B" in n).fill_(float("nan"))
    data = AsFTDataModule(tokenizer=tiny_world["aligned"], task_data=tiny_world["task"], n=40, harmful_ratio=0.0, val_size=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer.fit(module, data)


def test_bad_module_inputs(tiny_world, tiny_direction, tmp_path):
    from asft_lightning.module import AsFTModule
    from asft_lightning.tiny import tiny_llama_config

    with pytest.raises(ValueError, match="lam > 0 needs a direction"):
        AsFTModule(model=tiny_world["aligned"], lam=1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        AsFTModule(model=tiny_world["aligned"], direction=tiny_direction, lam=-1.0)
    with pytest.raises(DirectionError, match="direction file not found"):
        AsFTModule(model=tiny_world["aligned"], direction=str(tmp_path / "missing.safetensors"))
    # target modules that match nothing
    module = AsFTModule(model=tiny_world["aligned"], lam=0.0, target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="no_such_proj"):
        module.configure_model()
    # a direction made for another set of modules (q_proj only) than the LoRA targets (q_proj, v_proj)
    q_only = tmp_path / "q.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(q_only), target_modules=["q_proj"])
    module = AsFTModule(model=tiny_world["aligned"], direction=str(q_only))
    with pytest.raises(DirectionError, match="another set of modules"):
        module.configure_model()
    # a direction made for another model (other hidden size) is refused before the model is loaded
    from transformers import LlamaForCausalLM

    other = tmp_path / "other"
    for name in ("a", "u"):
        LlamaForCausalLM(tiny_llama_config(vocab_size=50, hidden=16)).save_pretrained(other / name)
    other_dir = tmp_path / "other.safetensors"
    extract_direction(str(other / "a"), str(other / "u"), str(other_dir))
    with pytest.raises(DirectionError, match="made for another model.*hidden_size"):
        AsFTModule(model=tiny_world["aligned"], direction=str(other_dir))
