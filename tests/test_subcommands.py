"""``asft direction`` and ``asft safelora`` through the CLI entry point, on the tiny world."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from asft_lightning.cli import main
from asft_lightning.direction import load_direction


def _adapter(world, path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(world["aligned"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    model.save_pretrained(path)


def test_direction_and_safelora_subcommands(tiny_world, tmp_path, capsys):
    out = tmp_path / "dir.safetensors"
    main(["direction", f"--aligned={tiny_world['aligned']}", f"--unaligned={tiny_world['unaligned']}",
          f"--output={out}", "--projector=subspace", "--rank=3"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["projector"]["kind"] == "subspace" and summary["modules"] == 4
    assert 0 < summary["max_C_eigenvalue"]
    directions = load_direction(out)
    assert all(m.basis.shape[1] == 3 for m in directions.modules.values())
    assert (tmp_path / "dir.safetensors.json").is_file()

    adapter = tmp_path / "adapter"
    _adapter(tiny_world, adapter)
    before = load_file(adapter / "adapter_model.safetensors")
    projected = tmp_path / "projected"
    main(["safelora", f"--adapter={adapter}", f"--direction={out}", f"--output={projected}", "--threshold=0.99"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["modules"] == 4 and printed["projected"] >= 1
    report = json.loads((projected / "safelora_report.json").read_text())
    assert len(report["modules"]) == 4
    after = load_file(projected / "adapter_model.safetensors")
    # every module below the threshold has B replaced by U U^T B; the others are untouched
    for name, entry in report["modules"].items():
        key = next(k for k in after if name in k and "lora_B" in k)
        md = directions.modules[name]
        expected = md.apply(before[key].double()).float() if entry["projected"] else before[key]
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-7)
    assert any(e["projected"] for e in report["modules"].values())
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        assert torch.equal(value, before[key]), "the input adapter was modified"


def test_subcommand_help_lists_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        main(["direction", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--projector" in text and "--target_modules" in text and "orthogonal projector" in " ".join(text.split())
