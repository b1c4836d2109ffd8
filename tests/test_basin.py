"""``asft basin``: the subspace math in float64, the exact undo, and both commands end to end on the tiny world."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from asft_lightning import basin as B
from asft_lightning.basin_command import attribute, curves
from asft_lightning.cli import main
from asft_lightning.direction import DirectionError, DirectionSet, ModuleDirection
from asft_lightning.errors import ArgumentError, AsftError, DataError
from asft_lightning.evaluate import AdapterMismatchError

# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _tree_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(path)).encode())
            digest.update(f.read_bytes())
            digest.update(str(f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def _bases(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0, v_rank: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d_out, d_in) in shapes.items():
        if v_rank is None:
            v = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        else:
            v = torch.randn(d_out, v_rank, generator=gen, dtype=torch.float64) @ torch.randn(
                v_rank, d_in, generator=gen, dtype=torch.float64
            )
        modules[name] = ModuleDirection(name, (d_out, d_in), torch.linalg.vector_norm(v), direction=v)
    return B.build_bases(DirectionSet("mem", {}, modules), rank)


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory) -> dict[str, str]:
    """Probe files for the tiny world: margin triples, benign prompts."""
    from asft_lightning.tiny import REFUSAL

    root = tmp_path_factory.mktemp("basin_files")
    rows = [json.loads(x) for x in Path(tiny_world["harmful"]).read_text().splitlines()[:10]]
    harmful = root / "harmful_eval.jsonl"
    harmful.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "refusal": REFUSAL, "compliance": r["response"]}) + "\n" for r in rows)
    )
    benign = root / "benign.jsonl"
    benign.write_text("".join(json.dumps({"prompt": f"the movie was {w}"}) + "\n" for w in ("lovely", "dull", "fun")))
    empty = root / "empty.jsonl"
    empty.write_text("")
    return {"harmful": str(harmful), "benign": str(benign), "empty": str(empty)}


@pytest.fixture(scope="module")
def adapter(tiny_world, tmp_path_factory) -> str:
    """A LoRA r=4 adapter of the aligned tiny model on q_proj, v_proj and down_proj (down_proj has no direction)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("basin_adapter") / "adapter"
    model.save_pretrained(str(out))
    return str(out)


def _margin_of(model, tokenizer, path: str, answer_tokens: int | None = 32) -> float:
    from asft_lightning.margin import load_margin_pairs, margin_scores

    pairs = load_margin_pairs(path)
    records = margin_scores(model.eval(), tokenizer, pairs, batch_size=8, max_length=256, answer_tokens=answer_tokens)
    return math.fsum(r.margin for r in records) / len(records)


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_rank", [None, 2])  # full-rank V (V sticks out of U_k), and V inside its top-3 subspace
def test_orthogonal_and_subspace_directions_in_float64(v_rank):
    bases = _bases({"a": (12, 10), "b": (6, 9)}, rank=3, v_rank=v_rank)
    for b in bases.values():
        assert torch.allclose(b.u.T @ b.u, torch.eye(3, dtype=torch.float64), atol=1e-14)
        if v_rank is not None:
            assert b.w() is None  # V lies in span(U_k): nothing to add
    for draw in range(3):
        for family in ("orthogonal", "subspace", "gaussian", "+V", "-V"):
            for name, d in B.family_direction(family, bases, seed=7, draw=draw):
                b = bases[name]
                v = b.v64()
                assert d.dtype == torch.float64
                assert math.isclose(float(torch.linalg.vector_norm(d)), b.norm, rel_tol=1e-14)
                scale = float(torch.linalg.vector_norm(d)) * b.norm
                if family == "orthogonal":  # orthogonal to every column of U_k and to V
                    assert float((b.u.T @ d).abs().max()) <= 1e-14 * float(d.abs().max()) * d.shape[0]
                    assert abs(float((d * v).sum())) <= 1e-14 * scale
                if family == "subspace":  # inside S = {U_k X} + span{V}, orthogonal to V
                    assert float((d - b.project(d)).abs().max()) <= 1e-14 * float(d.abs().max())
                    assert abs(float((d * v).sum())) <= 1e-14 * scale
                if family in ("+V", "-V"):
                    assert torch.equal(d, v if family == "+V" else -v)


def test_random_directions_are_seeded():
    bases = _bases({"a": (8, 8)}, rank=2)
    one = dict(B.family_direction("orthogonal", bases, seed=3, draw=1))
    again = dict(B.family_direction("orthogonal", bases, seed=3, draw=1))
    other = dict(B.family_direction("orthogonal", bases, seed=3, draw=2))
    assert torch.equal(one["a"], again["a"]) and not torch.equal(one["a"], other["a"])
    with pytest.raises(ArgumentError, match="unknown direction family"):
        list(B.family_direction("sideways", bases))


@pytest.mark.parametrize("v_rank", [None, 2])
def test_split_parts_sum_to_the_update_and_are_orthogonal(v_rank):
    bases = _bases({"a": (16, 12)}, rank=4, seed=1, v_rank=v_rank)
    b = bases["a"]
    gen = torch.Generator().manual_seed(5)
    for delta in (torch.randn(16, 12, generator=gen, dtype=torch.float64),
                  torch.randn(16, 2, generator=gen) @ torch.randn(2, 12, generator=gen),  # a rank-2 float32 update
                  -0.3 * b.v64()):  # fmt: skip
        parts = B.split_update(delta, b)
        d = delta.to(torch.float64)
        total = parts["along"] + parts["inside"] + parts["orth"]
        assert float((total - d).abs().max()) <= 4 * torch.finfo(torch.float64).eps * float(d.abs().max())
        v = b.v64()
        size = float(torch.linalg.vector_norm(d))
        for x, y in (("along", "inside"), ("along", "orth"), ("inside", "orth")):
            assert abs(float((parts[x] * parts[y]).sum())) <= 1e-13 * size**2
        assert abs(float((parts["inside"] * v).sum())) <= 1e-13 * size * b.norm
        assert float((b.u.T @ parts["orth"]).abs().max()) <= 1e-13 * size
        assert float((parts["inside"] - b.project(parts["inside"])).abs().max()) <= 1e-13 * size
        along_coefficient = float((d * v).sum()) / b.norm**2
        assert torch.allclose(parts["along"], along_coefficient * v, rtol=0, atol=1e-14 * size)
    parts = B.split_update(-0.3 * b.v64(), b)  # an update along V is all "along"
    assert float(torch.linalg.vector_norm(parts["inside"] + parts["orth"])) <= 1e-14 * float(torch.linalg.vector_norm(parts["along"]))


def test_perturb_and_undo_restore_every_weight_bit_for_bit(tiny_world):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]).eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    gen = torch.Generator().manual_seed(0)
    deltas = {n: torch.randn(dict(model.named_modules())[n].weight.shape, generator=gen, dtype=torch.float64) for n in names}

    def same() -> bool:
        after = model.state_dict()
        return all(torch.equal(before[k].view(torch.int32), after[k].detach().view(torch.int32)) for k in before)

    with B.WeightPerturbation(model, names) as perturb:
        for t in (1e-3, -2.5, 7.0, 1e-30):
            perturb.apply(deltas.items(), t)
            assert not same() or t == 1e-30
            perturb.restore()
            assert same()
        perturb.apply(deltas.items(), 3.0)
    assert same()  # the context manager restores on the way out
    with pytest.raises(RuntimeError, match="boom"), B.WeightPerturbation(model, names) as perturb:
        perturb.apply(deltas.items(), 1.0)
        raise RuntimeError("boom")
    assert same()
    perturb = B.WeightPerturbation(model, names[:1])  # modules not given to apply() go back to W0
    perturb.apply([(names[0], deltas[names[0]])], 1.0)
    perturb.apply([], 1.0)
    assert same()
    with pytest.raises(ArgumentError, match="not a linear layer"):
        B.WeightPerturbation(model, ["model.norm"])


def test_probe_rows_are_a_seeded_sample():
    from asft_lightning.basin_command import _pick

    rows = list(range(100))
    one, again, other = _pick(rows, 10, 0, "harmful"), _pick(rows, 10, 0, "harmful"), _pick(rows, 10, 1, "harmful")
    assert one == again != other and len(set(one)) == 10 and one != rows[:10]
    assert _pick(rows, 10, None, "harmful") == rows[:10] and _pick(rows, None, None, "x") == rows
    assert sorted(_pick(rows, 500, 3, "benign")) == rows


def test_step_grid_checks():
    assert B.check_steps([1, 0, -1]) == [-1.0, 0.0, 1.0]
    with pytest.raises(ArgumentError, match="--steps: the grid must contain 0"):
        B.check_steps([-1, 1])
    with pytest.raises(ArgumentError, match="--steps: step sizes must be finite numbers, got \\[nan\\]"):
        B.check_steps([0, float("nan")])
    with pytest.raises(ArgumentError, match="finite"):
        B.check_steps([0, float("inf")])
    with pytest.raises(ArgumentError, match="repeat"):
        B.check_steps([0, 1, 1])
    with pytest.raises(ArgumentError, match="at least two"):
        B.check_steps([0], "hs_steps")


def _fake_curves(margins: dict[str, list[float]], steps=(-2.0, -1.0, 0.0, 1.0, 2.0)) -> dict:
    fams = {}
    for family, values in margins.items():
        summary = [{"t": t, "draws": 1, "margin": m} for t, m in zip(steps, values, strict=True)]
        fams[family] = {"draws": 1 if family in ("+V", "-V") else 5, "points": [], "summary": summary}
    return {"steps": list(steps), "baseline": {"margin": 1.0}, "families": fams}


def test_verdict_wording():
    holds = B.curves_verdict(_fake_curves({
        "+V": [0.0, 0.5, 1.0, 1.1, 1.2], "-V": [1.2, 1.1, 1.0, 0.5, 0.0], "orthogonal": [0.2, 0.5, 1.0, 0.5, 0.2],
    }), rank=32)  # fmt: skip
    assert holds["premise_holds"] is True
    assert holds["tolerance"] == 0.25  # half of the drop along -V at t = 1
    assert holds["families"]["orthogonal"]["lost_at"] == 1.0 and holds["families"]["+V"]["lost_at"] is None
    assert holds["text"].startswith("Along +V the margin stays within 0.25 of the aligned model (1.000 nats/token) up to t = 2")
    assert "the basin premise holds here" in holds["text"]
    fails = B.curves_verdict(_fake_curves({
        "+V": [0.0, 0.5, 1.0, 1.1, 1.2], "-V": [1.2, 1.1, 1.0, 0.5, 0.0], "orthogonal": [1.0, 1.0, 1.0, 0.95, 0.9],
    }), tolerance=0.2)  # fmt: skip
    assert fails["premise_holds"] is False and fails["tolerance_rule"] == "given"
    assert "does not hold here (orthogonal directions do not break safety at these step sizes; it is lost only by " \
           "moving against V)" in fails["text"]


# --------------------------------------------------------------------------------------------------------------
# asft basin curves, end to end
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curves_run(tiny_world, tiny_direction, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("basin_curves") / "out"
    before = _tree_hash(tiny_world["aligned"]), Path(tiny_direction).read_bytes()
    main(["basin", "curves", f"--model={tiny_world['aligned']}", f"--direction={tiny_direction}",
          f"--harmful_data={files['harmful']}", f"--benign_data={files['benign']}", f"--task_data={tiny_world['task']}",
          f"--output_dir={out}", "--steps=[-1, -0.5, 0, 0.5, 1]", "--draws=2", "--rank=4", "--hs_steps=[0, 1]",
          "--hs_limit=4", "--max_new_tokens=6", "--case_sensitive=false", "--progress=false", "--task_limit=6"])  # fmt: skip
    assert (_tree_hash(tiny_world["aligned"]), Path(tiny_direction).read_bytes()) == before  # inputs untouched
    return out, json.loads((out / "basin_curves.json").read_text())


def test_curves_json_numbers(curves_run, tiny_world, files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = curves_run
    base = report["baseline"]
    assert set(report["families"]) == set(B.FAMILIES)
    assert report["steps"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    for family, entry in report["families"].items():
        assert entry["draws"] == (2 if family in B.RANDOM_FAMILIES else 1)
        assert len(entry["points"]) == entry["draws"] * 5
        for p in entry["points"]:
            assert math.isfinite(p["margin"]) and math.isfinite(p["harmful_loss"]) and math.isfinite(p["task_loss"])
            if p["t"] == 0:  # every family at t = 0 is the unperturbed model
                assert (p["margin"], p["harmful_loss"], p["task_loss"]) == (
                    base["margin"], base["harmful_loss"], base["task_loss"])  # fmt: skip
        zero = next(r for r in entry["summary"] if r["t"] == 0)
        assert zero["margin"] == base["margin"]
    assert all(report["undo_check"][k] for k in ("margins_equal", "harmful_loss_equal", "task_loss_equal"))
    plus = {p["t"]: p for p in report["families"]["+V"]["points"]}
    for p in report["families"]["-V"]["points"]:  # -V at t is +V at -t, the same weights
        assert p["margin"] == plus[-p["t"]]["margin"]
    # random draws differ from each other away from 0
    ortho = [p["margin"] for p in report["families"]["orthogonal"]["points"] if p["t"] == 1.0]
    assert len(ortho) == 2 and ortho[0] != ortho[1]
    # the baseline is the aligned model's margin, as margin_scores computes it
    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    aligned = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    assert base["margin"] == pytest.approx(_margin_of(aligned, tok, files["harmful"]), abs=1e-6)
    # -V at t = 1 moves q_proj / v_proj back to the unaligned model's: the same margin as that hybrid model
    from asft_lightning.checkpoints import CheckpointReader

    reader = CheckpointReader(tiny_world["unaligned"])
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                module.weight.copy_(reader.get(f"{name}.weight"))
    minus_one = next(p for p in report["families"]["-V"]["points"] if p["t"] == 1.0)
    assert minus_one["margin"] == pytest.approx(_margin_of(aligned, tok, files["harmful"]), abs=1e-4)
    # HS and the benign refusal rate at the HS steps, for the first draw only
    hs = [(f, p["t"], p["draw"]) for f, e in report["families"].items() for p in e["points"] if "harmful_score" in p]
    assert ("+V", 1.0, 0) in hs and ("orthogonal", 1.0, 0) in hs and ("orthogonal", 1.0, 1) not in hs
    assert "harmful_score" in base and "benign_refusal" in base and base["harmful_prompts"] == 4
    # the verdict, the files
    verdict = report["verdict"]
    assert verdict["text"].startswith("Along +V the margin") and "basin premise" in verdict["text"]
    assert verdict["premise_holds"] in (True, False) and verdict["tolerance"] > 0
    assert (out / "basin_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verdict: " in (out / "basin_curves.md").read_text()
    assert report["settings"]["rank"] == 4 and report["settings"]["margin_prompts"] == 10


def test_curves_from_an_adapter(tiny_world, tiny_direction, files, adapter, tmp_path):
    """With --adapter the curves start from the merged model: t = 0 is the fine-tune's margin."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = curves(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                    output_dir=str(tmp_path / "o"), adapter=adapter, steps=[0, 1], families=["+V", "orthogonal"],
                    draws=1, rank=4, progress=False)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), adapter)
    assert report["baseline"]["margin"] == pytest.approx(_margin_of(merged.merge_and_unload(), tok, files["harmful"]), abs=1e-6)
    assert set(report["families"]) == {"+V", "orthogonal"}


def test_curves_score_the_first_answer_tokens(tiny_world, tiny_direction, files, tmp_path):
    """--answer_tokens K: the margin and harmful loss of the first K tokens of each answer, as margin_scores gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    aligned = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    reports = {
        k: curves(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                  output_dir=str(tmp_path / f"o{k}"), steps=[0, 1], families=["+V"], rank=4, answer_tokens=k,
                  progress=False)
        for k in (2, None)
    }  # fmt: skip
    for k, report in reports.items():
        assert report["settings"]["answer_tokens"] == k
        assert report["baseline"]["margin"] == pytest.approx(_margin_of(aligned, tok, files["harmful"], k), abs=1e-6)
    assert abs(reports[2]["baseline"]["margin"] - reports[None]["baseline"]["margin"]) > 1e-3
    with pytest.raises(ArgumentError, match="--answer_tokens must be >= 1, got 0"):
        curves(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
               output_dir=str(tmp_path / "bad"), answer_tokens=0, progress=False)


# --------------------------------------------------------------------------------------------------------------
# asft basin attribute, end to end
# --------------------------------------------------------------------------------------------------------------


def test_attribute_a_lora_adapter(tiny_world, tiny_direction, files, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = _tree_hash(adapter), _tree_hash(tiny_world["aligned"])
    out = tmp_path / "attr"
    main(["basin", "attribute", f"--model={tiny_world['aligned']}", f"--direction={tiny_direction}",
          f"--adapter={adapter}", f"--harmful_data={files['harmful']}", f"--task_data={tiny_world['task']}",
          f"--benign_data={files['benign']}", f"--output_dir={out}", "--rank=4", "--limit=6", "--task_limit=6",
          "--max_new_tokens=6", "--task_max_new_tokens=3", "--case_sensitive=false", "--progress=false"])  # fmt: skip
    assert (_tree_hash(adapter), _tree_hash(tiny_world["aligned"])) == before
    report = json.loads((out / "basin_attribution.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    rows = report["settings"]["margin_rows"]  # a seeded sample of 6 of the 10 rows
    assert len(rows) == 6 == len(set(rows)) and rows != list(range(6))
    lines = Path(files["harmful"]).read_text().splitlines(keepends=True)
    limited = tmp_path / "six.jsonl"
    limited.write_text("".join(lines[i] for i in rows))
    assert report["aligned"]["margin"] == pytest.approx(_margin_of(base, tok, str(limited)), abs=1e-6)
    rows = {r["name"]: r for r in report["configs"]}
    assert report["settings"]["hs_prompts"] == 6 and report["aligned"]["harmful_prompts"] == 6
    with_adapter = PeftModel.from_pretrained(base, adapter)
    assert rows["full"]["margin"] == pytest.approx(_margin_of(with_adapter, tok, str(limited)), abs=1e-4)
    # q and v have a direction, down_proj does not: its update is the "uncovered" part
    assert report["settings"]["updated_modules"] == 6 and report["settings"]["modules_with_direction"] == 4
    assert {"along alone", "update minus along", "inside alone", "orth alone", "uncovered alone", "q alone",
            "update minus v", "along of q alone", "update minus orth of v"} <= set(rows)  # fmt: skip
    aliases = {a["name"] for a in rows["uncovered alone"]["aliases"]}
    assert aliases == {"mlp alone", "uncovered of mlp alone"}  # the same (module, part) set, measured once
    assert "update minus uncovered of q" not in rows and all(
        "uncovered of q" not in a["name"] for r in report["configs"] for a in r["aliases"])  # fmt: skip
    for r in report["configs"]:
        for key in ("margin", "harmful_loss", "harmful_score", "fine_tune_accuracy", "benign_refusal"):
            assert key in r
    groups = report["statistics"]["groups"]
    assert set(groups) == {"q", "v", "mlp"}
    for g in ("q", "v"):  # three shares, each rounded to 6 places: the sum is 1 within 1.5e-6
        assert sum(groups[g][f"{p}_share"] for p in ("along", "inside", "orth")) == pytest.approx(1, abs=2e-6)
    assert groups["mlp"]["uncovered_share"] == pytest.approx(1, abs=1e-5)  # rounded to 6 places
    assert sum(g["share_of_update"] for g in groups.values()) == pytest.approx(1, abs=1e-5)
    verdict = report["verdict"]
    assert verdict["text"].startswith("The update moves the margin from")
    assert set(verdict["parts"]) == {"along", "inside", "orth", "uncovered"}
    assert set(verdict["groups"]) == {"q", "v", "mlp"}
    assert (out / "basin_attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert "| configuration |" in (out / "basin_attribution.md").read_text()


def test_attribute_a_full_fine_tune(tiny_world, tiny_direction, files, tmp_path):
    """dW = W_fine_tuned - W_model for every linear layer that changed; a changed norm is reported, not applied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) and ".layers.0." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.model.norm.weight.mul_(1.01)
    ft = tmp_path / "ft"
    model.save_pretrained(ft)
    report = attribute(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                       output_dir=str(tmp_path / "o"), fine_tuned=str(ft), rank=4, generate=False, progress=False)  # fmt: skip
    assert report["settings"]["updated_modules"] == 2 and report["settings"]["modules_with_direction"] == 1
    assert report["settings"]["update"]["changed_outside_linear_layers"] == ["model.norm.weight"]
    assert "harmful_score" not in report["aligned"] and "margin" in report["aligned"]
    # "full" applies exactly the linear changes: compare with a model that has those and the original norm
    with torch.no_grad():
        model.model.norm.weight.copy_(AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]).model.norm.weight)
    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    full = next(r for r in report["configs"] if r["name"] == "full")
    assert full["margin"] == pytest.approx(_margin_of(model, tok, files["harmful"]), abs=6e-7)  # JSON: 6 digits
    assert set(report["statistics"]["groups"]) == {"q", "k"}
    assert report["statistics"]["groups"]["k"]["uncovered_share"] == pytest.approx(1, abs=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any model is loaded
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    import asft_lightning.basin_command as C

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(C, "_load_model", refuse)


@pytest.fixture(scope="module")
def other_model(tiny_world, tmp_path_factory) -> dict[str, str]:
    """A hidden-16 tiny model pair with its direction, and a LoRA adapter for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from asft_lightning.direction import extract_direction
    from asft_lightning.tiny import tiny_llama_config

    root = tmp_path_factory.mktemp("other")
    config = tiny_llama_config(len(AutoTokenizer.from_pretrained(tiny_world["aligned"])), hidden=16)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / name)
    extract_direction(str(root / "a"), str(root / "b"), str(root / "direction.safetensors"), hash_inputs=False)
    extract_direction(str(root / "a"), str(root / "b"), str(root / "subspace.safetensors"), projector="subspace",
                      rank=2, hash_inputs=False)  # fmt: skip
    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(root / "adapter"))
    return {"model": str(root / "a"), "direction": str(root / "direction.safetensors"),
            "subspace": str(root / "subspace.safetensors"), "adapter": str(root / "adapter")}  # fmt: skip


def _curves(tiny_world, tiny_direction, files, tmp_path, **kwargs):
    args = dict(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                output_dir=str(tmp_path / "o"), rank=4, draws=1, steps=[0, 1], progress=False)  # fmt: skip
    args.update(kwargs)
    return curves(**args)


def test_curves_bad_input(tiny_world, tiny_direction, files, other_model, tmp_path, no_loading):
    bad = lambda **kw: _curves(tiny_world, tiny_direction, files, tmp_path, **kw)  # noqa: E731
    with pytest.raises(DirectionError, match="made for another model than --model"):
        bad(direction=other_model["direction"])
    with pytest.raises(DirectionError, match=r"needs V itself"):
        bad(model=other_model["model"], direction=other_model["subspace"])
    with pytest.raises(ArgumentError, match="--steps: the grid must contain 0"):
        bad(steps=[-1, 1])
    with pytest.raises(ArgumentError, match="--steps: step sizes must be finite"):
        bad(steps=[0, float("inf")])
    with pytest.raises(ArgumentError, match="--draws must be >= 1, got 0"):
        bad(draws=0)
    with pytest.raises(ArgumentError, match=r"--rank 16: .*module model\.layers\.0\.self_attn\.v_proj is 16 x 32"):
        bad(rank=16)
    with pytest.raises(ArgumentError, match=r"--families: unknown \['sideways'\]"):
        bad(families=["+V", "sideways"])
    with pytest.raises(ArgumentError, match=r"--hs_steps \[0\.5\] are not on the grid"):
        bad(hs_steps=[0, 0.5])
    with pytest.raises(AdapterMismatchError, match=r"does not fit model .*16 -> 16.*32 -> 32"):
        bad(adapter=other_model["adapter"])
    with pytest.raises(DataError, match=r"harmful_data=.*empty"):
        bad(harmful_data=files["empty"])
    with pytest.raises(DataError, match=r"benign_data=.*empty"):
        bad(benign_data=files["empty"])
    with pytest.raises(DataError, match="harmful_data=.*columns 'refusal', 'compliance'.*missing"):
        bad(harmful_data=files["benign"])
    with pytest.raises(FileNotFoundError, match="--model"):
        bad(model=str(tmp_path / "missing"))
    with pytest.raises(DirectionError, match="direction file not found"):
        bad(direction=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ArgumentError, match="inside --model"):
        bad(output_dir=str(Path(tiny_world["aligned"]) / "basin"))


def test_direction_for_other_modules_of_the_same_model(tiny_world, tiny_direction, files, tmp_path, no_loading):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tiny_direction, framework="pt") as fh:
        meta = json.loads(fh.metadata()["asft"])
        tensors = {k.replace("layers.1.", "layers.7."): fh.get_tensor(k) for k in fh.keys()}
    meta["modules"] = {k.replace("layers.1.", "layers.7."): v for k, v in meta["modules"].items()}
    renamed = tmp_path / "renamed.safetensors"
    save_file(tensors, str(renamed), metadata={"asft": json.dumps(meta)})
    with pytest.raises(DirectionError, match=r"are not linear layers of --model .*model\.layers\.7\."):
        _curves(tiny_world, str(renamed), files, tmp_path)


def test_attribute_bad_input(tiny_world, tiny_direction, files, other_model, adapter, tmp_path, no_loading):
    def bad(**kw):
        args = dict(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                    output_dir=str(tmp_path / "o"), rank=4, progress=False)  # fmt: skip
        args.update(kw)
        return attribute(**args)

    with pytest.raises(ArgumentError, match="exactly one of --adapter"):
        bad()
    with pytest.raises(ArgumentError, match="exactly one of --adapter"):
        bad(adapter=adapter, fine_tuned=tiny_world["unaligned"])
    with pytest.raises(AdapterMismatchError, match="does not fit model"):
        bad(adapter=other_model["adapter"])
    with pytest.raises(DataError, match="empty"):
        bad(adapter=adapter, harmful_data=files["empty"])
    with pytest.raises(ArgumentError, match="--limit must be >= 1"):
        bad(adapter=adapter, limit=0)
    with pytest.raises(FileNotFoundError, match="--fine_tuned"):
        bad(fine_tuned=str(tmp_path / "nothing"))


def test_attribute_full_fine_tune_of_another_model(tiny_world, tiny_direction, files, other_model, tmp_path):
    with pytest.raises(AsftError, match="is not a fine-tune of --model"):
        attribute(model=tiny_world["aligned"], direction=tiny_direction, harmful_data=files["harmful"],
                  output_dir=str(tmp_path / "o"), fine_tuned=other_model["model"], rank=4, generate=False,
                  progress=False)  # fmt: skip


def test_help_and_console_errors(capsys, tiny_world, tiny_direction, files, tmp_path):
    from asft_lightning import cli

    for argv in (["basin", "--help"], ["basin", "curves", "--help"], ["basin", "attribute", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "curves" in text and "attribute" in text and "--hs_steps" in text and "--fine_tuned" in text
    if not hasattr(cli, "console"):
        pytest.skip("asft's console error handling (issue 11) is not in this checkout")
    status = cli.console(["basin", "curves", f"--model={tiny_world['aligned']}", f"--direction={tiny_direction}",
                      f"--harmful_data={files['harmful']}", f"--output_dir={tmp_path / 'o'}", "--steps=[1, 2]"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "asft basin: error: --steps: the grid must contain 0" in err
