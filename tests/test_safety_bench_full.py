"""``benchmarks/safety_bench.py``'s full fine-tune rows (issue 14 item 5): ``sft_full``, a full-parameter fine-tune of
the aligned model on SFT's data mix, and ``sft_full_restore``, ``asft restore`` of it through a fresh LoRA adapter
against ``--reference_model`` the aligned model. Cache keys on a stand-in world with a patched trainer; both rows for
real on the tiny world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_safety_bench import _arg, sb, stub_world


def test_full_rows_are_opt_in():
    assert set(sb.FULL_ROWS) == {"sft_full", "sft_full_restore"} and set(sb.FULL_ROWS) <= set(sb.POST_HOC_ROWS)
    default = sb.parse_args(["--world", "w"]).methods.split(",")
    assert not set(sb.FULL_ROWS) & set(default)
    assert sb.parse_args(["--world", "w", "--methods", "sft_full"]).full_lr == 2e-5
    assert all(m in sb.METHODS for m in sb.FULL_ROWS)


def test_restoration_defaults_follow_asft_restore():
    """The benchmark's default restoration rows use ``asft restore``'s defaults (its literals are a twin of
    ``RestorationConfig``'s, kept out of the import so that parsing the flags loads no torch)."""
    from asft_lightning.restoration import RestorationConfig

    args, cfg = sb.parse_args(["--world", "w"]), RestorationConfig()
    assert (args.target_margin, args.trust_region) == (cfg.target_margin, cfg.trust_region)
    assert (args.task_loss_budget, args.cg_max_iter, args.fisher_damping) == (cfg.task_loss_budget, cfg.cg_max_iter,
                                                                              cfg.fisher_damping)


def test_full_finetune_keys_and_plan(tmp_path, monkeypatch):
    """The full fine-tune's folder follows SFT's settings and --full_lr (not --lr); its restoration follows the full
    fine-tune's content and the restoration settings; an evaluation on the aligned model keeps its old key."""
    world = stub_world(tmp_path / "w", extra=("harmful_restore.jsonl",))
    trained = []

    def fake_train(model, output, task_data, harmful_data, **kw):
        trained.append({"model": model, "task_data": task_data, "harmful_data": harmful_data, **kw})
        Path(output).mkdir(parents=True)
        (Path(output) / "model.safetensors").write_text(json.dumps(kw, sort_keys=True))  # content follows settings
        report = {**kw, "parameters": 1, "steps": 1, "losses": [1.0]}
        (Path(output) / sb.FULL_REPORT).write_text(json.dumps(report))
        return report

    fits = []

    def fake_fit(argv):  # asft fit of the LoRA rows: an adapter whose content is its command line
        fits.append(argv)
        out = Path(_arg(argv, "--model.adapter_output"))
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_model.safetensors").write_text(" ".join(a for a in argv if "/runs/" not in a))

    monkeypatch.setattr(sb, "train_full_finetune", fake_train)
    monkeypatch.setattr("asft_lightning.cli.lightning_cli", fake_fit)
    work = iter(range(1000))

    def fresh(**over):
        args = sb.parse_args(["--world", str(world), "--workdir", str(tmp_path / f"cache{next(work)}"),
                              "--judges", "keyword"])
        for k, v in over.items():
            setattr(args, k, v)
        return sb.Bench(args)

    model, _, info = fresh().sft_full(42)
    assert model.name == "model" and (model / sb.FULL_REPORT).is_file()
    assert trained[-1] == {"model": str(world / "aligned"), "task_data": str(world / "task_train.jsonl"),
                           "harmful_data": str(world / "harmful_attack.jsonl"), "n": 200, "p": 0.1, "epochs": 2,
                           "lr": 2e-5, "batch_size": 8, "max_length": 160, "seed": 42}
    assert info["lr"] == 2e-5 and info["model"] == model.parent.name
    folder = model.parent.name
    assert fresh(lr=1e-3, lam_safelora=9.0, solver="cg").sft_full(42)[0].parent.name == folder  # not its settings
    for over in ({"full_lr": 1e-4}, {"n": 100}, {"p": 0.5}, {"epochs": 1}, {"batch_size": 4}, {"max_length": 64}):
        assert fresh(**over).sft_full(42)[0].parent.name != folder, over
    assert fresh().sft_full(1)[0].parent.name != folder
    b = fresh()
    calls = len(trained)
    assert b.sft_full(42)[0] == b.sft_full(42)[0] and len(trained) == calls + 1  # cached after the first
    # The restoration: a fresh adapter on the full fine-tune, the aligned model as the reference.
    plan = b.restore_plan("sft_full_restore", 42)
    assert (plan["base"], plan["adapter"], plan["reference"]) == (b.sft_full(42)[0], None, str(world / "aligned"))
    assert (plan["harmful"], plan["solver"], plan["kind"]) == ("harmful_restore", "fisher", "curvature")
    out = plan["output"].name
    assert out.startswith("sft_full_restore-seed42-")
    assert fresh(full_lr=1e-4).restore_plan("sft_full_restore", 42)["output"].name != out  # another full fine-tune
    assert fresh(solver="cg").restore_plan("sft_full_restore", 42)["output"].name != out
    assert fresh(target_margin=-0.2).restore_plan("sft_full_restore", 42)["output"].name != out
    assert fresh(lr=1e-3).restore_plan("sft_full_restore", 42)["output"].name == out
    assert not fits  # the full rows never run asft fit (it trains LoRA adapters only)
    lora = b.restore_plan("sft_restore_curvature", 42)
    assert (lora["base"], lora["adapter"], lora["reference"]) == (None, lora["src"], None)
    # Evaluation keys: the aligned model as base adds nothing (the keys of every existing row are unchanged).
    old = b.work / "eval" / sb._key([b.eval_settings(), None])
    assert b.eval_dir(None) == old and b.eval_dir(None, Path(world / "aligned")) == old
    assert b.base_key(None) == [] and b.base_key(world / "aligned") == []
    full_eval = b.eval_dir(None, plan["base"])
    assert full_eval != old and b.base_key(plan["base"]) == [{"base": sb.digest(plan["base"])}]


def test_tiny_full_finetune_and_restore_end_to_end(tmp_path, monkeypatch):
    """sft_full and sft_full_restore for real on the tiny world (one seed, beside SFT): the full fine-tune is a
    loadable model directory that differs from the aligned weights, trained on SFT's data mix; the restoration ran
    against the aligned model and raised the harmful loss; both rows were evaluated on the full fine-tune; a second
    run only reads caches."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import asft_lightning.cli
    from asft_lightning.tiny import REFUSAL, build_tiny_demo_world

    root = tmp_path / "world"
    build_tiny_demo_world(root)
    harmful = [json.loads(x) for x in (root / "harmful.jsonl").read_text().splitlines()]
    (root / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "source": "toy", "category": "c", "refusal": REFUSAL,
                    "compliance": r["response"]}) + "\n" for r in harmful[:6]))
    (root / "harmful_restore.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harmful[100:140]))  # fmt: skip
    calls = []
    fit = asft_lightning.cli.lightning_cli
    monkeypatch.setattr("asft_lightning.cli.lightning_cli", lambda argv: (calls.append(argv), fit(argv))[1])
    # p 0.5, 2 epochs and a tiny-model learning rate: the full fine-tune lowers the harmful loss enough for the
    # restoration to have something to raise.
    argv = ["--world", str(root), "--harmful_eval", str(root / "eval.jsonl"), "--workdir", str(tmp_path / "cache"),
            "--methods", "sft,sft_full,sft_full_restore", "--seeds", "42", "--n", "16", "--p", "0.5", "--epochs",
            "2", "--full_lr", "1e-3", "--rank", "4", "--restore_harmful", "8", "--restore_retain", "8",
            "--restore_steps", "2", "--target_margin", "0.01", "--trust_region", "0.05", "--judges", "keyword", "--eval_benign", "2", "--eval_task", "4",
            "--max_new_tokens", "4", "--task_max_new_tokens", "2", "--eval_batch_size", "4", "--replicates", "100",
            "--out_json", str(tmp_path / "res" / "safety.json"),
            "--out_md", str(tmp_path / "res" / "safety.md")]  # fmt: skip
    summary = sb.main(argv)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["sft", "sft_full", "sft_full_restore"]
    for method, row in rows.items():
        assert all(math.isfinite(row[k]) for k in ("hs", "fa", "margin", "seconds")), (method, row)
        assert row["d_hs_vs_sft"] is not None and summary["details"][method]["paired_seeds"] == [42]
    assert json.loads((tmp_path / "res" / "safety.json").read_text())["rows"] == summary["rows"]
    bench = sb.Bench(sb.parse_args(argv))
    train = sb.train_full_finetune
    monkeypatch.setattr(sb, "train_full_finetune", lambda *a, **kw: pytest.fail("retrained the full fine-tune"))
    model_dir, train_seconds, info = bench.sft_full(42)

    # 1. The full fine-tune: a model directory (weights + tokenizer) that loads and differs from the aligned model.
    aligned = AutoModelForCausalLM.from_pretrained(bench.paths["aligned"]).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    assert set(tuned) == set(aligned)
    changed = [k for k in aligned if not torch.equal(aligned[k], tuned[k])]
    assert len(changed) > len(aligned) // 2  # every weight is trained, not a few modules
    assert AutoTokenizer.from_pretrained(str(model_dir)).get_vocab() == AutoTokenizer.from_pretrained(
        bench.paths["aligned"]).get_vocab()
    # ... on exactly LoRA SFT's data mix and settings (its asft fit command line), with no asft fit of its own.
    (sft_call,) = calls
    report = json.loads((model_dir / sb.FULL_REPORT).read_text())
    for flag, key in (("--data.task_data", "task_data"), ("--data.harmful_data", "harmful_data"), ("--data.n", "n"),
                      ("--data.harmful_ratio", "p"), ("--data.batch_size", "batch_size"),
                      ("--data.max_length", "max_length"), ("--data.seed", "seed"),
                      ("--trainer.max_epochs", "epochs"), ("--model.model", "base_model")):
        assert _arg(sft_call, flag) == str(report[key]), flag
    assert report["lr"] == 1e-3 and report["steps"] == 4 and report["parameters"] == info["parameters"]
    assert rows["sft_full"]["seconds"] >= train_seconds and summary["details"]["sft_full"]["train_seconds"] == (
        train_seconds)
    # Deterministic by the seed: training again gives the same weights.
    again = tmp_path / "again"
    train(bench.paths["aligned"], again, report["task_data"], report["harmful_data"], n=16, p=0.5, epochs=2, lr=1e-3,
          batch_size=8, max_length=160, seed=42)
    repeat = AutoModelForCausalLM.from_pretrained(str(again)).state_dict()
    assert all(torch.equal(repeat[k], tuned[k]) for k in tuned)

    # 2. The restoration: asft restore on the full fine-tune, without an adapter, against the aligned model.
    plan = bench.restore_plan("sft_full_restore", 42)
    restoration = json.loads((plan["output"] / "restoration_report.json").read_text())
    assert restoration["inputs"]["model"] == str(model_dir) and restoration["inputs"]["adapter"] is None
    assert restoration["inputs"]["reference_model"] == bench.paths["aligned"]
    assert restoration["inputs"]["harmful_data"] == str(root / "harmful_restore.jsonl")
    assert restoration["settings"]["config"]["solver"] == "fisher"
    result = restoration["result"]
    assert result["final_harmful_loss"] > result["initial_harmful_loss"]  # raised towards the aligned level
    assert result["initial_harmful_loss"] < result["reference_harmful_loss"]
    # Reproducible: the fresh adapter's initialisation is seeded by the row's seed (asft restore does not seed it).
    from safetensors.torch import load_file

    bench.restore({**plan, "output": tmp_path / "restored-again"}, 42)
    first, second = (load_file(str(d / "adapter_model.safetensors"))
                     for d in (plan["output"], tmp_path / "restored-again"))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    extra = summary["details"]["sft_full_restore"]["extra"]["42"]
    assert extra["restore_base"] == {"full_finetune": model_dir.parent.name, "reference_model": bench.paths["aligned"]}
    assert extra["harmful_loss"] == [result["initial_harmful_loss"], result["final_harmful_loss"]]

    # 3. Both rows were evaluated on the full fine-tune as the base model (the restored adapter on it).
    for adapter in (None, plan["output"]):
        settings = json.loads((bench.eval_dir(adapter, model_dir) / "main" / "eval.json").read_text())["settings"]
        assert settings["model"] == str(model_dir)
        assert settings["adapter"] == (str(adapter) if adapter else None)
    assert bench.eval_dir(None, model_dir) != bench.eval_dir(None)
    md = (tmp_path / "res" / "safety.md").read_text()
    assert "| sft_full | 1 |" in md and "| sft_full_restore | 1 |" in md
    assert f"full-parameter fine-tune of {info['parameters']:,} weights" in md
    assert f"a fresh LoRA adapter on the full fine-tune {model_dir.parent.name}, reference aligned" in md

    # 4. Resume: nothing is trained, restored or evaluated again.
    for target in ("asft_lightning.cli.lightning_cli", "asft_lightning.evaluate.evaluate",
                   "asft_lightning.restore_command.restore_adapter"):
        monkeypatch.setattr(target, lambda *a, target=target, **kw: pytest.fail(f"{target} ran again"))
    assert sb.main(argv)["rows"] == summary["rows"]
