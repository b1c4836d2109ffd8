"""``benchmarks/restore_cost.py`` on the tiny world: the baseline and every variant run for real through
``restore_adapter`` (a stand-in for the safety benchmark's cache only supplies paths and settings), and the
report's ratios are the measured wall times over the measured baseline."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("restore_cost", REPO / "benchmarks" / "restore_cost.py")
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


@pytest.fixture(scope="module")
def bench(tiny_world, tmp_path_factory):
    from asft_lightning.data import _load_tokenizer, load_samples, sample_batches
    from asft_lightning.tiny import lora_attack

    tok = _load_tokenizer(tiny_world["aligned"], None)
    harmful = load_samples(tiny_world["harmful"], "harmful_data", "prompt", "response")
    task = load_samples(tiny_world["task"], "task_data", "instruction", "output", "input")
    adapter = tmp_path_factory.mktemp("cost") / "adapter"
    lora_attack(tiny_world["aligned"], sample_batches(tok, harmful[:100] + task[:100], 16, 64)).save_pretrained(adapter)
    args = SimpleNamespace(restore_harmful=32, restore_retain=32, batch_size=8, max_length=64, restore_steps=10,
                           trust_region=0.02, task_loss_budget=0.1, cg_max_iter=3, target_margin=0.01,
                           fisher_damping=1.0)
    paths = {"aligned": tiny_world["aligned"], "harmful_restore": tiny_world["harmful"], "task_train": tiny_world["task"]}
    return SimpleNamespace(args=args, paths=paths), adapter


def test_baseline_variants_and_report(bench):
    b, adapter = bench
    base = rc.baseline_seconds(b, adapter, reps=2, hvp=True)
    assert base["retain_hvp_s"] > 0
    assert base["harmful_pairs"] == 32 and base["retain_pairs"] == 32
    assert 0 < base["tokens"] <= base["padded_tokens"] and base["fwd_bwd_s"] == min(base["fwd_bwd_all_s"]) > 0
    results = [rc.run_variant(b, adapter, name, cg_steps=1) for name in ("fisher", "first_order", "cg")]
    fisher, first, cg = results
    assert (fisher["method"], fisher["solver"], first["method"], cg["max_steps"]) == (
        "curvature", "fisher", "first_order", 1)
    assert cg["steps"] == 1 and fisher["max_steps"] == 10
    for r in results:
        assert r["wall_s"] >= r["restore_s"] >= sum(r["step_s"]) > 0
        assert r["harmful_loss"][1] > r["harmful_loss"][0]  # every variant really raised the harmful loss
    assert fisher["restored"] and fisher["harmful_loss"][1] >= fisher["reference_harmful_loss"] - 0.01
    report = {"date": "d", "machine": "m", "threads": 1, "command": "c", "load_before": "0", "seed": 42,
              "batch_size": 8, "max_length": 64, "baseline": base, "variants": results, "verdict": "v"}
    text = rc.render(report)
    assert "one Hessian-vector product of the retain loss" in text
    for r in results:
        assert f"| {r['wall_s'] / base['fwd_bwd_s']:.1f}x |" in text
    assert text.count("\n| ") == 1 + len(results) and text.count("\n|---") == 1  # header, rule, a row each
