"""Restoration: the algorithm on a tiny attacked model, the callback inside a fit, and `asft restore`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asft_lightning.cli import lightning_cli, main
from asft_lightning.data import _load_tokenizer, load_samples, sample_batches
from asft_lightning.restoration import RestorationConfig, mean_loss, restore
from asft_lightning.tiny import lora_attack

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def batches(tiny_world):
    tok = _load_tokenizer(tiny_world["aligned"], None)
    harmful = load_samples(tiny_world["harmful"], "harmful_data", "prompt", "response")
    task = load_samples(tiny_world["task"], "task_data", "instruction", "output", "input")
    return {
        "train": sample_batches(tok, harmful[:100] + task[:100], batch_size=16, max_length=64),
        "harmful": sample_batches(tok, harmful[100:148], batch_size=16, max_length=64),
        "retain": sample_batches(tok, task[200:248], batch_size=16, max_length=64),
    }


def _attacked(path: str, train, seed: int = 0):
    """The aligned tiny model after a harmful LoRA fine-tune (its harmful loss drops well below the aligned one)."""
    return lora_attack(path, train, seed=seed)


@pytest.fixture(scope="module")
def attacked_adapter(tiny_world, batches, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("attacked") / "adapter"
    _attacked(tiny_world["aligned"], batches["train"]).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "config",
    [
        RestorationConfig(solver="cg", trust_region=0.02, target_margin=0.01),
        RestorationConfig(solver="lbfgs", trust_region=0.02, target_margin=0.01),
        RestorationConfig(solver="cg", method="first_order", trust_region=0.02, target_margin=0.01),
        RestorationConfig(solver="cg", trust_region=0.02, target_margin=0.01, top_modules=1, max_steps=30),
        RestorationConfig(solver="fisher", trust_region=0.02, target_margin=0.01),
        RestorationConfig(solver="fisher", method="first_order", trust_region=0.02, target_margin=0.01),
    ],
    ids=["cg", "lbfgs", "first_order", "top1", "fisher", "first_order_fisher_metric"],
)
def test_restore_raises_harmful_loss_to_the_reference(tiny_world, batches, config):
    model = _attacked(tiny_world["aligned"], batches["train"])
    with torch.no_grad(), model.disable_adapter():
        reference = float(mean_loss(model, batches["harmful"]))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    result = restore(model, batches["harmful"], batches["retain"], config=config)
    assert result.reference_harmful_loss == pytest.approx(reference, rel=1e-6)
    assert result.initial_harmful_loss < reference - 0.2  # the attack really lowered it
    assert result.restored and "reference level" in result.stop_reason
    assert result.final_harmful_loss >= reference - config.target_margin
    assert result.final_task_loss - result.initial_task_loss <= config.task_loss_budget
    # the trajectory is recorded and the model really changed
    assert result.records and all(r.step_size > 0 for r in result.records)
    with torch.no_grad():
        assert float(mean_loss(model, batches["harmful"])) == pytest.approx(result.final_harmful_loss, rel=1e-5)
    changed = {k for k, v in model.state_dict().items() if "lora_" in k and not torch.equal(v, before[k])}
    assert changed
    if config.top_modules == 1:
        assert all(len(r.modules_touched) == 1 for r in result.records)
        touched = {m for r in result.records for m in r.modules_touched}
        assert {k.split(".lora_")[0] for k in changed} <= touched


def test_restore_stops_on_the_task_budget(tiny_world, batches):
    model = _attacked(tiny_world["aligned"], batches["train"])
    config = RestorationConfig(task_loss_budget=0.0, trust_region=0.5, backtracks=0)
    result = restore(model, batches["harmful"], batches["retain"], config=config)
    assert not result.restored and "budget" in result.stop_reason
    assert result.final_task_loss <= result.initial_task_loss + 1e-6  # the offending step was undone


def test_restore_bad_inputs(tiny_world, batches):
    model = _attacked(tiny_world["aligned"], batches["train"][:1])
    with pytest.raises(ValueError, match="no harmful batches"):
        restore(model, [], batches["retain"])
    with pytest.raises(ValueError, match="no retain batches"):
        restore(model, batches["harmful"], [])
    with pytest.raises(ValueError, match=r"damping must be in \(0, inf\), got 0"):
        RestorationConfig(damping=0.0)
    with pytest.raises(ValueError, match="refusal_weight=0.5 > 0 needs refusal batches"):
        restore(model, batches["harmful"], batches["retain"], config=RestorationConfig(refusal_weight=0.5))


def test_sdpa_model_is_restored_through_the_second_order_guard(tiny_world, batches):
    """An SDPA model (no double backward on CPU) gives the same restoration as an eager one: the guard switches."""
    results = []
    for attn in ("eager", "sdpa"):
        model = _attacked(tiny_world["aligned"], batches["train"])
        model.base_model.model.config._attn_implementation = attn
        res = restore(model, batches["harmful"], batches["retain"],
                      config=RestorationConfig(trust_region=0.02, target_margin=0.01, hvp_method="double_backward"))
        assert model.base_model.model.config._attn_implementation == attn  # restored afterwards
        results.append(res)
    assert results[0].final_harmful_loss == pytest.approx(results[1].final_harmful_loss, rel=1e-4)


@pytest.mark.slow
def test_callback_inside_fit(tiny_world, tiny_direction, tmp_path):
    out = tmp_path / "run"
    cli = lightning_cli(
        [
            "fit",
            f"--config={REPO / 'configs' / 'tiny.yaml'}",
            f"--model.model={tiny_world['aligned']}",
            f"--model.direction={tiny_direction}",
            "--model.lam=0",
            f"--model.adapter_output={out / 'adapter'}",
            f"--data.task_data={tiny_world['task']}",
            f"--data.harmful_data={tiny_world['harmful']}",
            "--data.n=160",
            "--data.harmful_ratio=0.5",
            "--data.val_size=16",
            "--trainer.max_steps=40",
            f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=asft_lightning.callbacks.CurvatureRestoration",
            f"--trainer.callbacks.harmful_data={tiny_world['harmful']}",
            "--trainer.callbacks.num_harmful=48",
            "--trainer.callbacks.trust_region=0.02",
            "--trainer.callbacks.target_margin=0.01",
        ]
    )
    (report_path,) = out.rglob("restoration.json")
    (run,) = json.loads(report_path.read_text())
    assert run["initial_harmful_loss"] < run["reference_harmful_loss"]
    assert run["restored"] and run["final_harmful_loss"] >= run["reference_harmful_loss"] - 0.01
    # the adapter written at the end of fit is the restored one
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), str(out / "adapter"))
    trained = {k.removeprefix("model."): v for k, v in cli.model.state_dict().items() if "lora_" in k}
    for key, value in loaded.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(value, trained[key])
    callback = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CurvatureRestoration")
    assert callback.state_dict()["history"][0]["restored"]


def test_callback_argument_checks():
    from asft_lightning.callbacks import CurvatureRestoration

    with pytest.raises(ValueError, match=r"num_harmful must be >= 1, got 0"):
        CurvatureRestoration(harmful_data="x.jsonl", num_harmful=0)
    with pytest.raises(ValueError, match=r"damping must be in \(0, inf\)"):
        CurvatureRestoration(harmful_data="x.jsonl", damping=-1.0)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        CurvatureRestoration(harmful_data="x.jsonl", every_n_epochs=0)


def test_callback_setup_checks_the_rows_it_will_use_divide_over_the_processes(tiny_world):
    """The batch counts are checked in setup on the rows actually loaded, including the training set's task rows."""
    from types import SimpleNamespace

    from asft_lightning.callbacks import CurvatureRestoration
    from asft_lightning.data import Sample

    def trainer(task_rows: int, world: int = 2):
        dm = SimpleNamespace(train_samples=[Sample("p", "r", "task", i) for i in range(task_rows)])
        return SimpleNamespace(world_size=world, strategy=None, datamodule=dm)

    cb = CurvatureRestoration(harmful_data=tiny_world["harmful"], num_harmful=32, num_retain=64, batch_size=16)
    cb.setup(trainer(task_rows=100), None, "fit")  # 2 harmful batches, 4 retain batches: both split over 2
    # Only 20 task rows in the training set: 2 batches, fine; 10 rows: 1 batch, which 2 processes cannot share.
    cb.setup(trainer(task_rows=20), None, "fit")
    with pytest.raises(ValueError, match=r"the training set's task rows gives 10 row\(s\).*1 batch\(es\).*2 processes"):
        cb.setup(trainer(task_rows=10), None, "fit")
    # num_harmful caps the rows, but the file decides how many there are: 3 batches of 16 from 48 rows.
    odd = CurvatureRestoration(harmful_data=tiny_world["harmful"], num_harmful=48, num_retain=32, batch_size=16)
    with pytest.raises(ValueError, match=r"harmful_data gives 48 row\(s\).*3 batch\(es\).*multiple of the world size 2"):
        odd.setup(trainer(task_rows=100), None, "fit")
    odd.setup(trainer(task_rows=100, world=1), None, "fit")  # one process: any count


def _restore_args(world, adapter, output, *extra):
    return [
        "restore",
        f"--model={world['aligned']}",
        f"--adapter={adapter}",
        f"--harmful_data={world['harmful']}",
        f"--retain_data={world['task']}",
        f"--output={output}",
        "--num_harmful=48",
        "--num_retain=48",
        "--batch_size=16",
        "--max_length=64",
        "--trust_region=0.02",
        "--target_margin=0.01",
        "--progress=false",
        *extra,
    ]


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def test_asft_restore_end_to_end(tiny_world, attacked_adapter, tmp_path):
    inputs_before = _files(Path(attacked_adapter))
    out = tmp_path / "restored"
    main(_restore_args(tiny_world, attacked_adapter, out))
    report = json.loads((out / "restoration_report.json").read_text())
    result = report["result"]
    assert result["restored"] and result["final_harmful_loss"] >= result["reference_harmful_loss"] - 0.01
    assert report["inputs"]["num_harmful"] == 48 and report["inputs"]["adapter_sha256"]
    assert _files(Path(attacked_adapter)) == inputs_before, "the input adapter was modified"
    # the restored adapter loads with PEFT and has the reported harmful loss
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), str(out)).eval()
    tok = _load_tokenizer(tiny_world["aligned"], None)
    harmful = sample_batches(tok, load_samples(tiny_world["harmful"], "h", "prompt", "response", limit=48), 16, 64)
    with torch.no_grad():
        assert float(mean_loss(model, harmful)) == pytest.approx(result["final_harmful_loss"], rel=1e-4)
    # deterministic: a re-run (e.g. after a kill) gives the same adapter
    main(_restore_args(tiny_world, attacked_adapter, out, "--overwrite=true"))
    first = load_file(out / "adapter_model.safetensors")
    out2 = tmp_path / "again"
    main(_restore_args(tiny_world, attacked_adapter, out2))
    second = load_file(out2 / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_asft_restore_goes_beyond_the_reference_with_a_negative_margin(tiny_world, attacked_adapter, tmp_path):
    """``--target_margin -0.2``: the harmful loss ends 0.2 nats above the reference (the overshooting step lands
    on that target), further than the default stop."""
    reports = {}
    for name, margin in (("default", "0.01"), ("beyond", "-0.2")):
        out = tmp_path / name
        main(_restore_args(tiny_world, attacked_adapter, out, f"--target_margin={margin}", "--max_steps=30"))
        reports[name] = json.loads((out / "restoration_report.json").read_text())["result"]
    beyond, default = reports["beyond"], reports["default"]
    assert beyond["config"]["target_margin"] == -0.2
    assert beyond["restored"], beyond["stop_reason"]
    assert beyond["final_harmful_loss"] >= beyond["reference_harmful_loss"] + 0.2 - 1e-6
    assert beyond["final_harmful_loss"] == pytest.approx(beyond["reference_harmful_loss"] + 0.2, abs=0.05)
    assert beyond["final_harmful_loss"] > default["final_harmful_loss"] + 0.1
    # every step that overshot was landed by false position: the evaluations are recorded, within the budget
    landed = [r["landing_evals"] for rep in reports.values() for r in rep["records"]]
    assert any(n > 0 for n in landed) and all(0 <= n <= 4 for n in landed)
    with pytest.raises(ValueError, match="target_margin must be finite"):
        RestorationConfig(target_margin=float("nan"))
    # the defaults are the margin rule's choice and the trust region it was chosen at (benchmarks/restore_margin.md)
    assert (RestorationConfig().target_margin, RestorationConfig().trust_region) == (-0.1, 0.2)


def test_an_overshooting_step_lands_past_the_stop_level_by_the_slack():
    """The secant aims ``LANDING_SLACK`` past the stop level ``reference - margin`` (never below the reference): aimed
    exactly at it, a secant falling short by a hair on a convex ``L_h`` left 7 more ever smaller steps (20 minutes
    on the world at margin -0.2)."""
    from asft_lightning.restoration import LANDING_SLACK, landing_level

    ref = 0.9489744901657104
    assert LANDING_SLACK == 0.01
    assert landing_level(ref, 0.01) == ref  # the default margin: exactly the reference, as before
    assert landing_level(ref, 0.05) == ref  # a stop below the reference: land on the reference
    assert landing_level(ref, 0.0) == ref + 0.01
    assert landing_level(ref, -0.2) == ref + 0.21
    for margin in (0.01, 0.0, -0.1, -0.2, -0.3):
        assert landing_level(ref, margin) >= ref - margin  # at or past the stop level: one landing ends the run


def test_landing_by_false_position_on_scalar_functions():
    """:func:`land` on functions with known roots: the first evaluation is the plain secant of the step; on a convex
    ``L_h``, where that secant falls short, Illinois false position reaches the stop level within the budget (plain
    false position would creep); on a concave one the secant already lands past it; out of evaluations it returns
    the highest point short of the stop level."""
    from asft_lightning.restoration import LANDING_EVALS, land

    calls = []

    def convex(x):
        calls.append(x)
        return x**6

    # convex, bracket [0, 1], aim 0.5, stop 0.49: the secant x = 0.5 gives 0.0156 (short)
    x, f, n = land(convex, (0.0, 0.0), (1.0, 1.0), aim=0.5, stop=0.49)
    assert calls[0] == pytest.approx(0.5)
    assert f >= 0.49 and f == pytest.approx(x**6) and 0.5 < x <= 1.0
    assert n == len(calls) == 3 and LANDING_EVALS == 4
    # the same bracket with one evaluation is the single secant of before, short of the stop level
    x1, f1, n1 = land(lambda x: x**6, (0.0, 0.0), (1.0, 1.0), aim=0.5, stop=0.49, max_evals=1)
    assert (x1, f1, n1) == (pytest.approx(0.5), pytest.approx(0.5**6), 1)
    # plain false position (no halving) needs more than the budget on this bracket: the Illinois step is what lands
    lo, hi, steps = (0.0, 0.0), (1.0, 1.0), 0
    while lo[1] < 0.49:
        xs = lo[0] + (hi[0] - lo[0]) * (0.5 - lo[1]) / (hi[1] - lo[1])
        lo, steps = (xs, xs**6), steps + 1
    assert steps == 6 > LANDING_EVALS
    # concave: sqrt(x) on [0, 1] aimed at 0.5 lands past the stop level at once, on a shorter step
    x, f, n = land(lambda x: x**0.5, (0.0, 0.0), (1.0, 1.0), aim=0.5, stop=0.49)
    assert n == 1 and x == pytest.approx(0.5) and f == pytest.approx(0.5**0.5)
    # a bracket starting at the current loss h_prev > 0, as in restore(): x is the step size from the start
    x, f, n = land(lambda x: 0.9 + 0.2 * x**2, (0.0, 0.9), (2.0, 1.7), aim=0.96, stop=0.95)
    assert f >= 0.95 and 0.9 + 0.2 * x**2 == pytest.approx(f) and x < 2.0 and n <= LANDING_EVALS


def test_asft_restore_bad_inputs(tiny_world, attacked_adapter, tmp_path):
    from transformers import LlamaForCausalLM

    from asft_lightning.tiny import tiny_llama_config

    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"damping must be in \(0, inf\)"):
        main(_restore_args(tiny_world, attacked_adapter, out, "--damping=0"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = [f"--harmful_data={empty}" if a.startswith("--harmful_data") else a
            for a in _restore_args(tiny_world, attacked_adapter, out)]
    with pytest.raises(ValueError, match=rf"harmful_data.*{empty.name}.*empty|empty.*{empty.name}"):
        main(args)
    with pytest.raises(ValueError, match="must not be inside"):
        main(_restore_args(tiny_world, attacked_adapter, Path(attacked_adapter) / "out"))
    with pytest.raises(ValueError, match="reference_model"):
        main([a for a in _restore_args(tiny_world, attacked_adapter, out) if not a.startswith("--adapter")])
    # an adapter made for another base model
    other = tmp_path / "other"
    LlamaForCausalLM(tiny_llama_config(vocab_size=80, hidden=16)).save_pretrained(other)
    from peft import LoraConfig, get_peft_model

    get_peft_model(LlamaForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "other_adapter")
    with pytest.raises(Exception, match="other_adapter"):
        main(_restore_args(tiny_world, tmp_path / "other_adapter", out))
    assert not out.exists()


def test_restoration_settings_are_declared_once_and_listed_in_both_helps(capsys):
    """``asft restore --help`` and the callback's help list every RestorationConfig field with the same text."""
    from dataclasses import fields

    from docstring_parser import parse

    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    restore_help = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "asft_lightning.callbacks.CurvatureRestoration"])
    callback_help = " ".join(capsys.readouterr().out.split())
    described = {p.arg_name: " ".join(p.description.split()) for p in parse(RestorationConfig.__doc__).params}
    for field in fields(RestorationConfig):
        assert field.name in described, f"RestorationConfig documents no {field.name}"
        assert f"--{field.name} " in restore_help, field.name
        assert f"--trainer.callbacks.{field.name} " in callback_help, field.name
        assert described[field.name] in restore_help and described[field.name] in callback_help, field.name


def test_per_batch_gradient_and_hvp_equal_those_of_the_whole_loss_in_float64(tiny_world, batches):
    """Restoration takes gradients and HVPs batch by batch (one batch's graph in memory); their means equal the
    gradient and the HVP of the mean loss over all batches computed in one graph (float64 model)."""
    from asft_lightning import curvature as cv
    from asft_lightning.restoration import _functional, _mean_grad, _mean_hvp, _value_and_grad

    model = _attacked(tiny_world["aligned"], batches["train"]).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    retain = [{k: v for k, v in b.items()} for b in batches["retain"]]
    assert len(retain) == 3
    whole = _functional(model, retain)
    per_batch = [_functional(model, [b]) for b in retain]
    _, g_whole = _value_and_grad(whole, params)
    g_batches = _mean_grad(per_batch, params)
    v = {k: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) for k, p in params.items()}
    with cv.second_order_attention(model):
        h_whole = cv.hvp(whole, params, v, method="double_backward")
        h_batches = _mean_hvp(per_batch, params, v, "double_backward")
    # Llama's RMSNorm computes in float32 even in a float64 model, so agreement is to float32 rounding
    g_scale = max(float(t.abs().max()) for t in g_whole.values())
    h_scale = max(float(t.abs().max()) for t in h_whole.values())
    for k in params:
        torch.testing.assert_close(g_batches[k], g_whole[k], rtol=1e-5, atol=1e-6 * g_scale)
        torch.testing.assert_close(h_batches[k], h_whole[k], rtol=1e-5, atol=1e-6 * h_scale)
    assert float(cv.norm(h_whole)) > 0 and float(cv.norm(g_whole)) > 0


def test_per_example_gradients_equal_each_examples_own_loss_in_the_padded_batch_in_float64(tiny_world, batches):
    """The Fisher's rows: each example's gradient, computed on the example cut to its mask, equals the gradient of
    that example's loss inside its padded batch (the other rows' labels masked out), float64."""
    from asft_lightning.restoration import _functional, _value_and_grad, per_example_gradients

    model = _attacked(tiny_world["aligned"], batches["train"]).double().eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    tok = _load_tokenizer(tiny_world["aligned"], None)
    mixed = load_samples(tiny_world["harmful"], "harmful_data", "prompt", "response")[100:104] + load_samples(
        tiny_world["task"], "task_data", "instruction", "output", "input")[200:204]
    batch = sample_batches(tok, mixed, batch_size=8, max_length=64)[0]
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.min()) < int(lengths.max())  # the batch really has padding to cut
    grads = per_example_gradients(model, [batch], params)
    assert len(grads) == batch["input_ids"].shape[0]
    for i in (0, int(lengths.argmin()), int(lengths.argmax())):
        labels = torch.full_like(batch["labels"], -100)
        labels[i] = batch["labels"][i]
        _, ref = _value_and_grad(_functional(model, [{**batch, "labels": labels}]), params)
        scale = max(float(t.abs().max()) for t in ref.values())
        for k in params:
            torch.testing.assert_close(grads[i][k], ref[k], rtol=1e-5, atol=1e-6 * scale)


def test_fisher_solver_needs_no_second_order_attention_and_refuses_data_parallel(tiny_world, batches):
    from asft_lightning.errors import ArgumentError

    model = _attacked(tiny_world["aligned"], batches["train"])
    with pytest.raises(ArgumentError, match="solver 'fisher' runs on one process"):
        restore(model, batches["harmful"], batches["retain"], config=RestorationConfig(solver="fisher"),
                all_reduce=lambda t: t)
    with pytest.raises(Exception, match="fisher_damping must be in"):
        RestorationConfig(solver="fisher", fisher_damping=0.0)


def test_default_solver_is_the_fisher_on_one_process_and_cg_under_data_parallelism(tiny_world, batches):
    from asft_lightning.restoration import resolve_solver

    assert RestorationConfig().solver == "auto"
    assert resolve_solver(RestorationConfig(), distributed=False).solver == "fisher"
    assert resolve_solver(RestorationConfig(), distributed=True).solver == "cg"
    for explicit in ("cg", "lbfgs", "fisher"):
        assert resolve_solver(RestorationConfig(solver=explicit), distributed=True).solver == explicit
    cfg = RestorationConfig(trust_region=0.02, target_margin=0.01, max_steps=1)
    one = restore(_attacked(tiny_world["aligned"], batches["train"]), batches["harmful"], batches["retain"], config=cfg)
    ranked = restore(_attacked(tiny_world["aligned"], batches["train"]), batches["harmful"], batches["retain"],
                     config=cfg, all_reduce=lambda t: t)  # a mean over one rank
    assert one.config["solver"] == "fisher" and ranked.config["solver"] == "cg"
    assert cfg.solver == "auto"  # the caller's settings are not changed
    # the auto run is exactly the explicit Fisher run
    fisher = restore(_attacked(tiny_world["aligned"], batches["train"]), batches["harmful"], batches["retain"],
                     config=RestorationConfig(solver="fisher", trust_region=0.02, target_margin=0.01, max_steps=1))
    assert one.final_harmful_loss == fisher.final_harmful_loss and one.records[0].step_size == fisher.records[0].step_size


def test_asft_restore_of_a_full_fine_tune_end_to_end_is_deterministic(tiny_world, tmp_path):
    """A full-parameter fine-tune (the tiny world's unaligned model: same architecture, it complies) restored
    through a fresh LoRA adapter against the aligned model as reference: the harmful loss rises to the aligned
    model's, the input model is untouched, and a re-run gives the same adapter (the fresh adapter's initialisation
    is seeded, and the caller's random generator is left as it was)."""
    full = Path(tiny_world["unaligned"])
    before = _files(full)

    def run(out: Path, *extra: str) -> dict:
        main(["restore", f"--model={full}", f"--reference_model={tiny_world['aligned']}",
              f"--harmful_data={tiny_world['harmful']}", f"--retain_data={tiny_world['task']}", f"--output={out}",
              "--num_harmful=48", "--num_retain=48", "--batch_size=16", "--max_length=64", "--trust_region=0.02",
              "--target_margin=0.01", "--max_steps=30", "--solver=fisher", "--task_loss_budget=0.5", "--progress=false", *extra])
        return json.loads((out / "restoration_report.json").read_text())

    state = torch.random.get_rng_state()
    report = run(tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)
    result = report["result"]
    assert report["inputs"]["adapter"] is None and report["inputs"]["reference_model"] == tiny_world["aligned"]
    assert report["settings"]["fresh_adapter_seed"] == 0
    assert result["initial_harmful_loss"] < result["reference_harmful_loss"] - 0.2  # the full fine-tune complies
    assert result["restored"] and result["final_harmful_loss"] >= result["reference_harmful_loss"] - 0.01
    assert _files(full) == before, "the input model was modified"
    run(tmp_path / "b")
    first, second = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("a", "b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    run(tmp_path / "c", "--seed=1")
    other = load_file(tmp_path / "c" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], other[k]) for k in first)
