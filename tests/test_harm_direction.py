"""``asft harm-direction`` (harmful fine-tune + subspace extraction in one command) and ``configs/harm_anchor.yaml``
(the harmful-reference anchor from one ``--config`` flag) on the tiny world; bad input before any work."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from asft_lightning.adapter_io import read_adapter
from asft_lightning.cli import console, lightning_cli, main
from asft_lightning.direction import load_direction
from asft_lightning.errors import ArgumentError, InputNotFoundError, OutputExistsError
from asft_lightning.harm_reference import harm_direction

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "harm_anchor.yaml"


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    """One ``asft harm-direction`` run on the tiny world (rank 4, 16 harmful pairs, one epoch)."""
    out = tmp_path_factory.mktemp("harm") / "harm.safetensors"
    main(["harm-direction", f"--aligned={tiny_world['aligned']}", f"--harmful_data={tiny_world['harmful']}",
          f"--task_data={tiny_world['task']}", f"--output={out}", "--rank=4", "--n=16", "--epochs=1",
          "--batch_size=4", "--val_size=0", "--accelerator=cpu"])  # fmt: skip
    return out


def test_harm_direction_is_the_subspace_of_minus_s_B_A(built):
    """The file holds, per module, the top-4 left singular subspace of the reference adapter's -s B A (float64
    reference), marked as a harmful reference; the adapter was trained on harmful pairs only, with lam 0."""
    directions = load_direction(built)
    assert directions.reference == "harmful" and directions.metadata["projector"]["kind"] == "subspace"
    assert Path(str(built) + ".json").is_file()
    adapter_dir = Path(str(built) + ".reference") / "adapter"
    adapter = read_adapter(adapter_dir)
    assert set(directions.modules) == set(adapter.pairs) and len(directions.modules) == 4  # q, v x 2 layers
    for name, md in directions.modules.items():
        a, b = adapter.factors(name)
        dense = -adapter.scaling(name) * (b.double() @ a.double())
        u = torch.linalg.svd(dense, full_matrices=False)[0][:, :4]
        assert md.kind == "subspace" and md.basis.shape == (dense.shape[0], 4)
        torch.testing.assert_close(md.basis.double() @ md.basis.double().T, u @ u.T, atol=1e-5, rtol=0)
    (config,) = list(Path(str(built) + ".reference").rglob("config.yaml"))
    saved = yaml.safe_load(config.read_text())
    assert saved["model"]["lam"] == 0.0 and saved["data"]["harmful_ratio"] == 1.0 and saved["data"]["n"] == 16
    assert saved["seed_everything"] == 0 and saved["data"]["seed"] == 0


def test_harm_anchor_config_is_one_flag_on_asft_fit(tiny_world, built, tmp_path):
    """``asft fit --config configs/harm_anchor.yaml`` (the command in the YAML's head) with the tiny world's files:
    the anchored fit runs with harm_subspace at the config's lam, a positive penalty, and records the anchor."""
    head = CONFIG.read_text().splitlines()[0]
    assert head.startswith("# asft fit --config configs/harm_anchor.yaml ")
    words = shlex.split(head[2:].replace("<aligned>", tiny_world["aligned"]).replace("harm.safetensors", str(built))
                        .replace("<task.jsonl>", tiny_world["task"]).replace("<pairs.jsonl>", tiny_world["harmful"]))
    assert words[:3] == ["asft", "fit", "--config"]
    words[3] = str(REPO / words[3])
    settings = yaml.safe_load(CONFIG.read_text())["model"]
    assert settings["anchor"] == "harm_subspace" and settings["lam"] > 0
    cli = lightning_cli([*words[1:], "--data.n=16", "--data.val_size=0", "--data.batch_size=4",
                         "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
                         f"--trainer.default_root_dir={tmp_path}", f"--model.adapter_output={tmp_path / 'adapter'}",
                         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])  # fmt: skip
    assert cli.model.hparams["anchor"] == "harm_subspace" and cli.model.hparams["lam"] == settings["lam"]
    assert cli.trainer.global_step == 3
    meta = json.loads((tmp_path / "adapter" / "asft_meta.json").read_text())
    assert meta["anchor"] == "harm_subspace" and meta["direction_reference"] == "harmful"
    assert float(cli.trainer.callback_metrics["train/penalty"]) > 0


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        ({"harmful_data": "missing.jsonl"}, InputNotFoundError, r"--harmful_data .*missing\.jsonl"),
        ({"aligned": "no_model_here"}, InputNotFoundError, r"--aligned .*no_model_here"),
        ({"rank": 0}, ArgumentError, r"--rank must be an integer >= 1, got 0"),
        ({"n": -3}, ArgumentError, r"--n must be an integer >= 1, got -3"),
        ({"learning_rate": float("nan")}, ArgumentError, r"--learning_rate must be a finite number > 0"),
        ({"output": "harm.pt"}, ArgumentError, r"--output .*harm\.pt: a direction file must end in \.safetensors"),
    ],
)
def test_bad_input_is_refused_before_any_work(tiny_world, tmp_path, change, error, pattern):
    kwargs = {"aligned": tiny_world["aligned"], "harmful_data": tiny_world["harmful"], "task_data": tiny_world["task"],
              "output": str(tmp_path / "harm.safetensors")}
    kwargs.update({k: str(tmp_path / v) if k in ("harmful_data", "aligned", "output") else v for k, v in change.items()})
    with pytest.raises(error, match=pattern):
        harm_direction(**kwargs)
    assert list(tmp_path.iterdir()) == []  # no reference fine-tune started, nothing written


def test_existing_output_is_not_replaced(tiny_world, tmp_path, capsys):
    out = tmp_path / "harm.safetensors"
    out.write_text("a user's file")
    argv = ["harm-direction", f"--aligned={tiny_world['aligned']}", f"--harmful_data={tiny_world['harmful']}",
            f"--task_data={tiny_world['task']}", f"--output={out}"]
    with pytest.raises(OutputExistsError, match=r"--output .*harm\.safetensors exists; pass --overwrite true"):
        main(argv)
    assert console(argv) == 2  # the program: one error line, status 2
    assert "asft harm-direction: error: --output" in capsys.readouterr().err
    assert out.read_text() == "a user's file" and not Path(str(out) + ".reference").exists()
