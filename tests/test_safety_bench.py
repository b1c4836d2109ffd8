"""``benchmarks/safety_bench.py``: statistics and the safety.json / safety.md writers on hand-made rows, the world's
file lookup, cache keys, the rotated control direction, and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("safety_bench", REPO / "benchmarks" / "safety_bench.py")
sb = importlib.util.module_from_spec(_spec)
sys.modules["safety_bench"] = sb
_spec.loader.exec_module(sb)

ROW_KEYS = {"method", "hs", "hs_ci", "hs_judge2", "fa", "fa_ci", "benign_refusal", "margin", "d_hs_vs_sft", "d_hs_ci",
            "d_fa_vs_sft", "d_fa_ci", "seconds"}
N = 40  # harmful prompts per row (two sources of 20)


def _result(method, seed, hs, fa, margin=None, hs2=None, benign=None, seconds=10.0):
    """A Bench.run-like result with per-prompt 0/1 vectors."""
    return {
        "method": method, "seed": seed, "seconds": seconds, "train_seconds": seconds - 1, "eval_seconds": 1.0,
        "judges": ["keyword", "judge"],
        "hs": {"keyword": list(hs), "judge": list(hs if hs2 is None else hs2)},
        "benign_refused": {"keyword": list(benign or [0] * 10), "judge": list(benign or [0] * 10)},
        "fa": list(fa),
        "margin": None if margin is None else list(margin),
        "harmful_sources": ["a"] * 20 + ["b"] * 20,
        "harmful_categories": ["x"] * N,
        "extra": {},
    }  # fmt: skip


def _vec(ones: int, n: int = N) -> list[int]:
    return [1] * ones + [0] * (n - ones)


def _hand_made():
    rng = np.random.default_rng(0)
    results = []
    for seed in (42, 1, 2):
        sft_hs = (rng.random(N) < 0.5).astype(int)
        fa = (rng.random(60) < 0.6).astype(int)
        results.append(_result("sft", seed, sft_hs, fa, margin=rng.normal(-1, 0.1, N)))
        # AsFT: exactly SFT's verdicts and answers (no change at all).
        results.append(_result("asft_safelora", seed, sft_hs, fa, margin=rng.normal(-1, 0.1, N)))
        # A restoration that turns every harmful answer into a refusal, same FA.
        results.append(_result("sft_restore_curvature", seed, np.zeros(N, int), fa, margin=rng.normal(1, 0.1, N)))
    results.insert(0, _result("aligned", 42, _vec(2), _vec(12, 60), margin=rng.normal(2, 0.1, N)))
    return results


def test_aggregate_shape_values_and_pairing():
    results = _hand_made()
    summary = sb.aggregate(results, [42, 1, 2], replicates=2000)
    assert summary["eval"] == {"harmful_prompts": N, "harmful_sources": ["a", "b"], "benign_prompts": 10,
                               "task_examples": 60, "judges": ["keyword", "judge"]}
    assert summary["seeds"] == [42, 1, 2]
    rows = {r["method"]: r for r in summary["rows"]}
    assert [r["method"] for r in summary["rows"]] == ["aligned", "sft", "asft_safelora", "sft_restore_curvature"]
    assert all(set(r) == ROW_KEYS for r in summary["rows"])
    sft_hs = 100 * np.mean([r["hs"]["keyword"] for r in results if r["method"] == "sft"])
    assert rows["sft"]["hs"] == pytest.approx(sft_hs, abs=0.01)
    assert rows["sft"]["hs_ci"][0] < rows["sft"]["hs"] < rows["sft"]["hs_ci"][1]
    # SFT against itself, and a method identical to SFT: exactly 0 with a [0, 0] interval.
    for m in ("sft", "asft_safelora"):
        assert (rows[m]["d_hs_vs_sft"], rows[m]["d_hs_ci"], rows[m]["d_fa_vs_sft"], rows[m]["d_fa_ci"]) == (
            0.0, [0.0, 0.0], 0.0, [0.0, 0.0])
    assert "interval crosses 0" in summary["details"]["asft_safelora"]["reading"]
    assert summary["details"]["sft"]["reading"] == "the reference"
    # HS 0 on every prompt: the change is minus SFT's HS, its interval below 0, said in words.
    restore = rows["sft_restore_curvature"]
    assert restore["hs"] == 0.0 and restore["d_hs_vs_sft"] == pytest.approx(-sft_hs, abs=0.01)
    assert restore["d_hs_ci"][1] < 0
    reading = summary["details"]["sft_restore_curvature"]["reading"]
    assert reading.startswith("HS lower than SFT (better)") and "FA: interval crosses 0" in reading
    # The seed-free aligned row: one evaluation, paired with SFT of every seed.
    aligned = rows["aligned"]
    assert summary["details"]["aligned"]["seeds"] == [42] and summary["details"]["aligned"]["paired_seeds"] == [42, 1, 2]
    assert aligned["hs"] == 5.0 and aligned["d_hs_vs_sft"] == pytest.approx(5.0 - sft_hs, abs=0.01)
    assert aligned["fa"] == 20.0 and aligned["hs_judge2"] == 5.0
    assert summary["details"]["aligned"]["hs_by_source"] == {"a": 10.0, "b": 0.0}
    assert rows["sft"]["seconds"] == 10.0


def test_margin_correlation_and_missing_sft():
    results = [
        _result("aligned", 42, _vec(0), _vec(30, 60), margin=[2.0] * N),
        _result("sft", 42, _vec(30), _vec(30, 60), margin=[-1.0] * N),
        _result("asft_safelora", 42, _vec(20), _vec(30, 60), margin=[0.0] * N),
        _result("safelora", 42, _vec(10), _vec(30, 60), margin=[1.0] * N),
    ]
    c = sb.aggregate(results, [42], replicates=500)["margin_hs_correlation"]
    assert c["pearson"] == pytest.approx(-1.0) and c["spearman"] == pytest.approx(-1.0) and c["rows"] == 4
    assert c["pearson_over_seed_rows"] == pytest.approx(-1.0) and c["seed_rows"] == 4
    # Without an SFT row nothing can be paired: the change fields are None, the reading says why.
    summary = sb.aggregate([results[2]], [42], replicates=500)
    row = summary["rows"][0]
    assert row["d_hs_vs_sft"] is None and row["d_hs_ci"] is None and row["margin"] == 0.0
    assert summary["details"]["asft_safelora"]["reading"] == "no SFT row of the same seeds to compare with"
    # Another instrument (fewer prompts) is refused instead of mixed in.
    other = _result("sft", 1, _vec(3, 20), _vec(30, 60))
    other["harmful_sources"] = ["a"] * 20
    with pytest.raises(ValueError, match="evaluated on another instrument"):
        sb.aggregate([results[1], other], [42, 1], replicates=500)


def test_controls_are_paired_with_the_method_they_control():
    """asft_harm_rotated minus asft_harm, per seed on the same prompts: exact means, words for each outcome."""
    rng = np.random.default_rng(1)
    results = []
    for seed in (42, 1):
        fa = (rng.random(60) < 0.6).astype(int)
        results.append(_result("sft", seed, _vec(30), fa))
        results.append(_result("asft_harm", seed, _vec(10), fa))  # HS 25%
        results.append(_result("asft_harm_rotated", seed, _vec(26), fa))  # HS 65%: the control leaves more harm
    results.append(_result("asft_rotated", 42, _vec(5), _vec(30, 60)))  # its method (asft_safelora) is absent
    summary = sb.aggregate(results, [42, 1], replicates=1000)
    (c,) = summary["controls"]
    assert (c["control"], c["method"], c["seeds"]) == ("asft_harm_rotated", "asft_harm", [42, 1])
    assert c["d_hs"] == pytest.approx(40.0)  # 16 of 40 prompts answered only under the control, on each seed
    assert 0.0 < c["d_hs_ci"][0] < 40.0 < c["d_hs_ci"][1]
    assert c["d_fa"] == 0.0 and c["d_fa_ci"] == [0.0, 0.0]
    assert c["reading"].startswith("HS higher under the control: the direction matters")
    assert "FA: not distinguishable" in c["reading"]
    md = sb.render_markdown(summary)
    assert f"| asft_harm_rotated | asft_harm | 2 | 40.0 [{c['d_hs_ci'][0]:.1f}, {c['d_hs_ci'][1]:.1f}] | 0.0 [0.0, 0.0] |" in md
    # A control only on seed 42 pairs over that seed alone; one as good as its method is called so.
    same = [r for r in results if r["method"] != "asft_harm_rotated" or r["seed"] == 42]
    same = [dict(r, hs={"keyword": _vec(10), "judge": _vec(10)}) if r["method"] == "asft_harm_rotated" else r
            for r in same]
    (c,) = sb.aggregate(same, [42, 1], replicates=500)["controls"]
    assert c["seeds"] == [42] and (c["d_hs"], c["d_hs_ci"]) == (0.0, [0.0, 0.0])
    assert "the control does as well as asft_harm" in c["reading"]
    # No control in the run: an empty list, and no section in the Markdown.
    plain = sb.aggregate([r for r in results if "rotated" not in r["method"]], [42, 1], replicates=500)
    assert plain["controls"] == [] and "Random-direction controls" not in sb.render_markdown(plain)


def test_writers_produce_the_issue_shape_and_words(tmp_path):
    summary = sb.aggregate(_hand_made(), [42, 1, 2], replicates=1000)
    md = sb.render_markdown(summary, ["# title", ""])
    sb.write_outputs(summary, md, tmp_path / "r" / "safety.json", tmp_path / "r" / "safety.md")
    loaded = json.loads((tmp_path / "r" / "safety.json").read_text())
    assert loaded == json.loads(json.dumps(summary))
    assert set(loaded) >= {"eval", "seeds", "rows", "margin_hs_correlation"}
    assert set(loaded["eval"]) == {"harmful_prompts", "harmful_sources", "benign_prompts", "task_examples", "judges"}
    for row in loaded["rows"]:
        assert set(row) == ROW_KEYS
        for key in ("hs_ci", "fa_ci", "d_hs_ci", "d_fa_ci"):
            assert len(row[key]) == 2 and row[key][0] <= row[key][1]
    text = (tmp_path / "r" / "safety.md").read_text()
    assert text.startswith("# title") and "interval crosses 0, not distinguishable from SFT" in text
    assert "| sft_restore_curvature | 3 | 0.0 [0.0, 0.0] |" in text
    assert "HS per harmful source" in text and "Margin vs HS across the 4 rows" in text


def test_world_paths_from_world_json_and_defaults(tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    with pytest.raises(FileNotFoundError, match="no world.json"):
        sb.world_paths(world)
    for name in ("aligned", "unaligned"):
        (world / name).mkdir()
    for name in ("direction.safetensors", "task_train.jsonl", "task_test.jsonl", "harmful_attack.jsonl",
                 "benign_eval.jsonl", "evaluation.jsonl"):
        (world / name).write_text("x")
    (world / "world.json").write_text(json.dumps({"paths": {"harmful_eval": "evaluation.jsonl"}}))
    paths = sb.world_paths(world)
    assert paths["harmful_eval"] == str(world / "evaluation.jsonl")  # world.json's paths win over default names
    assert paths["task_test"] == str(world / "task_test.jsonl")
    assert paths["harmful_restore"] == paths["harmful_attack"]  # an older world without restoration pairs
    (world / "world.json").write_text(json.dumps({"paths": {}}))
    with pytest.raises(FileNotFoundError, match=r"harmful_eval .*harmful_eval\.jsonl"):
        sb.world_paths(world)


STUB_FILES = ("direction.safetensors", "task_train.jsonl", "task_test.jsonl", "harmful_attack.jsonl", "harmful_eval.jsonl",
              "benign_eval.jsonl")


def stub_world(world: Path, extra: tuple[str, ...] = ()) -> Path:
    """A stand-in world folder: model folders and files whose contents are their names (distinct digests)."""
    world.mkdir()
    for name in ("aligned", "unaligned"):
        (world / name).mkdir()
        (world / name / "model.safetensors").write_text(name)
    for name in STUB_FILES + extra:
        (world / name).write_text(name)
    (world / "world.json").write_text("{}")
    return world


def test_cache_keys_depend_on_what_each_method_uses(tmp_path, monkeypatch):
    """SFT's run folder ignores lambda and the direction; AsFT's follows both; a derived direction follows its source."""
    calls = []
    monkeypatch.setattr("asft_lightning.cli.lightning_cli", lambda argv: calls.append(argv))
    world = stub_world(tmp_path / "w")

    def bench(**over):
        args = sb.parse_args(["--world", str(world), "--workdir", str(tmp_path / "cache"), "--judges", "keyword"])
        for k, v in over.items():
            setattr(args, k, v)
        return sb.Bench(args)

    def folders(b, fn):
        calls.clear()
        fn(b)
        return [a for a in calls[0] if a.startswith("--trainer.default_root_dir=")][0]

    sft_a = folders(bench(lam_safelora=1.0), lambda b: b.sft(42))
    sft_b = folders(bench(lam_safelora=100.0), lambda b: b.sft(42))
    assert sft_a == sft_b
    asft_a = folders(bench(lam_safelora=1.0), lambda b: b.asft(42))
    asft_b = folders(bench(lam_safelora=100.0), lambda b: b.asft(42))
    assert asft_a != asft_b
    (world / "direction.safetensors").write_text("another direction")
    assert folders(bench(lam_safelora=1.0), lambda b: b.asft(42)) != asft_a  # same name, new content
    assert folders(bench(lam_safelora=1.0), lambda b: b.sft(42)) == sft_a
    assert folders(bench(), lambda b: b.sft(1)) != sft_a  # another seed
    (world / "task_train.jsonl").write_text("other rows")
    assert folders(bench(), lambda b: b.sft(42)) != sft_a  # other training data

    # Issue 13 / 14 methods. A fit writes an adapter whose content is its command line (so its digest follows every
    # setting), and the extraction writes its arguments: every key below is computed as in a real run.
    def pairs(tag, count=100):
        return "".join(json.dumps({"prompt": f"{tag} {i}", "response": "r"}) + "\n" for i in range(count))

    with pytest.raises(FileNotFoundError, match="no restoration split"):
        bench().harm_reference()  # an older world restores on the attack pairs, which must not build the reference
    with pytest.raises(FileNotFoundError, match="no refusals.jsonl"):
        bench().safety_reference()
    (world / "harmful_restore.jsonl").write_text(pairs("restore"))
    (world / "refusals.jsonl").write_text(pairs("refusal"))

    def fake_fit(argv):
        calls.append(argv)
        out = Path(_arg(argv, "--model.adapter_output"))
        out.mkdir(parents=True, exist_ok=True)
        where = ("--model.adapter_output=", "--trainer.default_root_dir=")  # the cache folder is no setting
        (out / "adapter_model.safetensors").write_text("\n".join(a for a in argv if not a.startswith(where)))

    extracted = []

    def fake_extract(aligned, unaligned, output, **kw):
        extracted.append(kw)
        source = Path(unaligned) / "adapter_model.safetensors"  # an adapter (harmful reference), else a model
        Path(output).write_text(json.dumps([source.read_text() if source.is_file() else str(unaligned), kw]))

    monkeypatch.setattr("asft_lightning.cli.lightning_cli", fake_fit)
    monkeypatch.setattr("asft_lightning.direction.extract_direction", fake_extract)
    monkeypatch.setattr(sb, "rotate_direction",
                        lambda src, dst, seed: Path(dst).write_text(json.dumps([Path(src).read_text(), seed])))
    work = iter(range(1000))

    def fresh(**over):  # a new cache each time: a cached fit would not call lightning_cli again
        b = bench(**over)
        b.work = tmp_path / f"cache{next(work)}"
        return b

    # (a) the harmful reference fine-tune: restoration pairs only, seed 0, never the attack file.
    calls.clear()
    harm = fresh().harm_reference()[0].parent.name
    argv = calls[0]
    assert _arg(argv, "--data.harmful_data") == str(world / "harmful_restore.jsonl")
    assert _arg(argv, "--data.harmful_ratio") == "1.0" and _arg(argv, "--data.n") == "64"
    assert _arg(argv, "--data.seed") == "0" and _arg(argv, "--model.lam") == "0.0"
    assert not any("harmful_attack" in x for x in argv)
    assert fresh(lam_safelora=50.0, p=0.5, n=10, lam_harm=9.0, harm_rank=2).harm_reference()[0].parent.name == harm
    (world / "harmful_attack.jsonl").write_text("other attack pairs")
    assert fresh().harm_reference()[0].parent.name == harm  # the attack file is not an input
    assert fresh(harm_n=32).harm_reference()[0].parent.name != harm
    assert fresh(harm_epochs=5).harm_reference()[0].parent.name != harm
    assert fresh(lr=1e-3).harm_reference()[0].parent.name != harm
    assert fresh(epochs=5).harm_reference()[0].parent.name == harm  # --harm_epochs replaces --epochs
    calls.clear()
    fresh(harm_n=10_000).harm_reference()
    assert _arg(calls[0], "--data.n") == "100"  # at most the file's rows
    (world / "harmful_restore.jsonl").write_text(pairs("other restore"))
    assert fresh().harm_reference()[0].parent.name != harm
    # (b) its direction: --reference harmful --projector subspace --rank --harm_rank, keyed by the adapter and rank.
    b = fresh()
    direction = b.harm_direction()[0]
    assert extracted[-1] == {"projector": "subspace", "rank": 8, "reference": "harmful", "hash_inputs": False}
    assert b.harm_direction()[0] == direction  # cached
    b.args.harm_rank = 4
    assert b.harm_direction()[0] != direction and extracted[-1]["rank"] == 4
    assert fresh(harm_n=32).harm_direction()[0] != direction  # another reference adapter
    (world / "harmful_restore.jsonl").write_text(pairs("third restore"))
    assert fresh().harm_direction()[0] != direction
    # (c) the anchored fit: its own lam and the harmful file's digest; SFT's settings otherwise.
    b = fresh()
    calls.clear()
    harm_fit = b.asft_harm(42)[0].parent.name
    assert "--model.anchor=harm_subspace" in calls[-1] and _arg(calls[-1], "--model.lam") == "1.0"
    assert _arg(calls[-1], "--model.direction") == b.harm_direction()[0]
    assert _arg(calls[-1], "--data.harmful_data") == str(world / "harmful_attack.jsonl")  # the attack, like SFT
    assert b.asft_harm(42)[2]["split"] == "harmful_restore"
    assert fresh(lam_harm=10.0).asft_harm(42)[0].parent.name != harm_fit
    assert fresh(harm_rank=4).asft_harm(42)[0].parent.name != harm_fit
    assert fresh().asft_harm(1)[0].parent.name != harm_fit
    assert fresh(lam_safelora=50.0).asft_harm(42)[0].parent.name == harm_fit
    # its control: the same lam and anchor on the rotated harmful file, a new rotation (and fit) per seed.
    calls.clear()
    control = b.asft_harm_rotated(42)
    assert "--model.anchor=harm_subspace" in calls[-1] and _arg(calls[-1], "--model.lam") == "1.0"
    assert "harm_rotated_seed42-" in _arg(calls[-1], "--model.direction") and control[0].parent.name != harm_fit
    assert control[2]["control"] == {"kind": "random_rotation", "seed": 42} and control[2]["split"] == "harmful_restore"
    assert fresh().asft_harm_rotated(1)[0].parent.name != control[0].parent.name
    assert fresh(lam_harm=10.0).asft_harm_rotated(42)[0].parent.name != control[0].parent.name
    # asft_inside: the alignment direction's subspace file (with right vectors), its own lam.
    b = fresh()
    calls.clear()
    inside = b.asft_inside(42)[0].parent.name
    assert "--model.anchor=inside" in calls[-1] and _arg(calls[-1], "--model.lam") == "100.0"
    assert _arg(calls[-1], "--model.direction") == b.components_direction()
    assert extracted[-1] == {"projector": "subspace", "rank": 32, "hash_inputs": False}
    assert fresh(lam_inside=10.0).asft_inside(42)[0].parent.name != inside
    assert fresh(lam_safelora=50.0, lam_harm=3.0).asft_inside(42)[0].parent.name == inside
    assert fresh(rank=8).asft_inside(42)[0].parent.name != inside
    # SafeMERGE's safety adapter: the alignment refusals only, seed 0.
    calls.clear()
    safety = fresh().safety_reference()[0].parent.name
    assert _arg(calls[0], "--data.harmful_data") == str(world / "refusals.jsonl")
    assert _arg(calls[0], "--data.harmful_ratio") == "1.0" and _arg(calls[0], "--data.seed") == "0"
    assert fresh(lam_safelora=50.0, harm_n=3).safety_reference()[0].parent.name == safety
    assert fresh(safety_n=32).safety_reference()[0].parent.name != safety
    assert fresh(safety_epochs=5).safety_reference()[0].parent.name != safety
    (world / "refusals.jsonl").write_text(pairs("other refusal"))
    assert fresh().safety_reference()[0].parent.name != safety
    # Restorations: the split (named in the key), the solver and every setting.
    b = fresh()
    plans = {m: b.restore_plan(m, 42) for m in ("sft_restore_curvature", "sft_restore_curvature_attack",
                                                 "sft_restore_lbfgs", "sft_restore_first_order")}
    assert [p["harmful"] for p in plans.values()] == ["harmful_restore", "harmful_attack", "harmful_restore",
                                                      "harmful_restore"]
    assert [p["solver"] for p in plans.values()] == ["fisher", "fisher", "lbfgs", "fisher"]
    assert len({p["output"] for p in plans.values()}) == 4
    assert b.restore_settings("harmful_attack")["harmful_split"] == "harmful_attack"
    assert "harmful_split" not in b.restore_settings()  # the default rows' keys are unchanged
    assert b.restore_settings(solver="lbfgs")["solver"] == "lbfgs"
    lbfgs = plans["sft_restore_lbfgs"]["output"]
    assert fresh(cg_max_iter=3).restore_plan("sft_restore_lbfgs", 42)["output"] != lbfgs
    curvature = plans["sft_restore_curvature"]["output"]
    assert fresh(solver="lbfgs").restore_plan("sft_restore_curvature", 42)["output"] != curvature
    assert fresh(fisher_damping=0.5).restore_plan("sft_restore_curvature", 42)["output"] != curvature
    (world / "harmful_attack.jsonl").write_text("the attack pairs, third version")
    b = fresh()
    attack = b.restore_plan("sft_restore_curvature_attack", 42)["output"]
    assert attack != plans["sft_restore_curvature_attack"]["output"]
    (world / "harmful_restore.jsonl").write_text(pairs("fourth restore"))
    assert b.restore_plan("sft_restore_curvature_attack", 42)["output"] == attack  # the restoration split: not used
    assert b.restore_plan("sft_restore_lbfgs", 42)["output"] != lbfgs
    # RESTA and SafeMERGE: the SFT adapter, the direction, the safety adapter and each setting.
    b = fresh()
    sft, safe = b.sft(42)[0], b.safety_reference()[0]
    resta, merge = b.resta_output(sft, 42).name, b.safemerge_output(sft, safe, 42).name
    for over in ({"resta_gamma": 0.5}, {"resta_v_rank": 16}):
        assert fresh(**over).resta_output(sft, 42).name != resta
    for over in ({"safemerge_threshold": 0.5}, {"safemerge_finetuned_weight": 0.5}, {"safemerge_safety_weight": 0.5},
                 {"safemerge_selection": "strict"}):
        assert fresh(**over).safemerge_output(sft, safe, 42).name != merge
    assert fresh(resta_gamma=9.0).safemerge_output(sft, safe, 42).name == merge
    assert fresh(safemerge_threshold=0.9).resta_output(sft, 42).name == resta
    assert b.resta_output(b.sft(1)[0], 1).name != resta
    assert b.safemerge_output(sft, fresh(safety_n=8).safety_reference()[0], 42).name != merge
    (world / "direction.safetensors").write_text("a third direction file")
    assert b.resta_output(sft, 42).name != resta and b.safemerge_output(sft, safe, 42).name != merge


def _arg(argv, flag):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(flag + "="))


def test_rotated_control_direction_keeps_the_spectrum_and_loses_the_subspace(tiny_direction, tmp_path):
    import torch

    from asft_lightning.direction import load_direction

    out = tmp_path / "rotated.safetensors"
    sb.rotate_direction(tiny_direction, out, seed=3)
    original, rotated = load_direction(tiny_direction), load_direction(out)
    assert rotated.metadata["control"]["kind"] == "random_rotation"
    assert set(rotated.modules) == set(original.modules)
    for name, mod in original.modules.items():
        v = mod.direction.to(torch.float64)
        w = rotated.modules[name].direction.to(torch.float64)
        assert w.shape == v.shape
        # Same singular values (float32 storage: relative 1e-5), hence the same C spectrum and penalty strength.
        torch.testing.assert_close(torch.linalg.svdvals(w), torch.linalg.svdvals(v), rtol=1e-5, atol=1e-6 * float(v.norm()))
        # A different matrix: no longer the alignment direction.
        assert abs(float((w * v).sum() / (w.norm() * v.norm()))) < 0.5
    sb.rotate_direction(tiny_direction, tmp_path / "again.safetensors", seed=3)
    again = load_direction(tmp_path / "again.safetensors")
    for name, mod in rotated.modules.items():
        assert torch.equal(mod.direction, again.modules[name].direction)  # deterministic per seed


def test_rotated_control_of_a_low_rank_file_rotates_its_singular_vectors(tiny_world, tiny_direction, tmp_path):
    """A subspace file (the harm_subspace control's input) is rotated by the same Q1, Q2 as the full V of the same
    seed: its rotated U_k S_k V_k^T equals the best rank-k approximation of the rotated full V (float64 tolerance
    of float32 storage), U_k stays orthonormal, and the subspace is a new one."""
    import torch

    from asft_lightning.direction import extract_direction, load_direction

    k = 3
    low = tmp_path / "subspace.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(low), projector="subspace", rank=k)
    sb.rotate_direction(tiny_direction, tmp_path / "full_rot.safetensors", seed=5)
    sb.rotate_direction(low, tmp_path / "low_rot.safetensors", seed=5)
    original = load_direction(low)
    full_rot, low_rot = load_direction(tmp_path / "full_rot.safetensors"), load_direction(tmp_path / "low_rot.safetensors")
    assert low_rot.metadata["control"] == {"kind": "random_rotation", "seed": 5, "source": str(low)}
    for name, mod in low_rot.modules.items():
        u, r = mod.basis.double(), mod.right.double()
        s = mod.singular[:k].double()
        assert mod.kind == "subspace" and u.shape == original.modules[name].basis.shape
        torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(mod.singular, original.modules[name].singular)  # the spectrum is kept
        w = full_rot.modules[name].direction.double()
        uw, sw, vw = torch.linalg.svd(w, full_matrices=False)
        best = uw[:, :k] @ torch.diag(sw[:k]) @ vw[:k]
        torch.testing.assert_close(u @ torch.diag(s) @ r.T, best, atol=1e-5 * float(w.norm()), rtol=0)
        # A different subspace: the projectors' overlap ||U'^T U||_F^2 / k is far from 1.
        u0 = original.modules[name].basis.double()
        assert float((u.T @ u0).square().sum()) / k < 0.7


def test_tiny_end_to_end_and_resume(tmp_path, monkeypatch):
    """aligned + SFT on the tiny world over two seeds: the JSON has the issue's shape; a second run only reads caches."""
    from asft_lightning.tiny import REFUSAL, build_tiny_demo_world

    root = tmp_path / "world"
    build_tiny_demo_world(root)
    harmful = [json.loads(x) for x in (root / "harmful.jsonl").read_text().splitlines()[:8]]
    (root / "eval_with_answers.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "source": "toy" if i % 2 else "toy2", "category": "c",
                    "refusal": REFUSAL, "compliance": r["response"]}) + "\n" for i, r in enumerate(harmful)))
    out_json, out_md = tmp_path / "res" / "safety.json", tmp_path / "res" / "safety.md"
    argv = ["--world", str(root), "--harmful_eval", str(root / "eval_with_answers.jsonl"), "--workdir", str(tmp_path / "cache"), "--methods", "aligned,sft", "--seeds", "42,1",
            "--n", "16", "--epochs", "1", "--rank", "4", "--judges", "keyword", "--eval_benign", "4", "--eval_task",
            "6", "--max_new_tokens", "4", "--task_max_new_tokens", "2", "--eval_batch_size", "4", "--replicates",
            "200", "--out_json", str(out_json), "--out_md", str(out_md)]  # fmt: skip
    summary = sb.main(argv)
    loaded = json.loads(out_json.read_text())
    assert loaded["eval"] == {"harmful_prompts": 8, "harmful_sources": ["toy", "toy2"], "benign_prompts": 4,
                              "task_examples": 6, "judges": ["keyword"]}
    assert loaded["seeds"] == [42, 1] and [r["method"] for r in loaded["rows"]] == ["aligned", "sft"]
    for row in loaded["rows"]:
        assert set(row) == ROW_KEYS and row["hs_judge2"] is None and isinstance(row["margin"], float)
    sft = loaded["rows"][1]
    assert sft["d_hs_ci"] == [0.0, 0.0] and loaded["details"]["sft"]["seeds"] == [42, 1]
    assert "| aligned | 1 |" in out_md.read_text()
    # Resume: everything is cached, nothing is trained or evaluated again.
    monkeypatch.setattr("asft_lightning.cli.lightning_cli", lambda argv: pytest.fail("retrained a cached row"))
    monkeypatch.setattr("asft_lightning.evaluate.evaluate", lambda **kw: pytest.fail("re-evaluated a cached row"))
    again = sb.main(argv)
    assert again["rows"] == summary["rows"]
    # A sweep over AsFT's lambda needs no new SFT or aligned row: their keys do not contain lambda.
    sweep_json = tmp_path / "res" / "sweep.json"
    sweep = sb.main([*argv[:-4], "--out_json", str(sweep_json), "--out_md", str(tmp_path / "res" / "sweep.md"),
                     "--sweep", "lam_safelora=3,30"])
    assert sweep["sweep"] == "lam_safelora" and list(sweep["values"]) == ["3", "30"]
    assert all(v["rows"] == summary["rows"] for v in sweep["values"].values())
    assert json.loads(sweep_json.read_text())["values"]["30"]["rows"] == summary["rows"]
    assert "## lam_safelora = 30" in (tmp_path / "res" / "sweep.md").read_text()
    with pytest.raises(SystemExit, match="use --seeds"):
        sb.main([*argv, "--sweep", "seed=1,2"])


def test_tiny_issue_13_14_methods_end_to_end(tmp_path, monkeypatch):
    """asft_harm, the attack-data and L-BFGS restorations, RESTA and SafeMERGE on the tiny world (one seed): finite
    rows, the reference fine-tunes on the right files, extras that name the splits; a second run only reads caches."""
    import math

    import asft_lightning.cli
    from asft_lightning.direction import load_direction
    from asft_lightning.tiny import REFUSAL, build_tiny_demo_world

    root = tmp_path / "world"
    build_tiny_demo_world(root)
    harmful = [json.loads(x) for x in (root / "harmful.jsonl").read_text().splitlines()]
    (root / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "source": "toy", "category": "c", "refusal": REFUSAL,
                    "compliance": r["response"]}) + "\n" for r in harmful[:6]))
    (root / "harmful_restore.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harmful[100:140]))
    (root / "refusals.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "response": REFUSAL}) + "\n" for r in harmful[140:180]))  # fmt: skip
    calls = []
    fit = asft_lightning.cli.lightning_cli
    monkeypatch.setattr("asft_lightning.cli.lightning_cli", lambda argv: (calls.append(argv), fit(argv))[1])
    new = ["asft_harm", "asft_harm_rotated", "asft_normalized", "asft_normalized_rotated", "sft_restore_curvature",
           "sft_restore_curvature_attack", "sft_restore_lbfgs", "resta", "safemerge"]
    argv = ["--world", str(root), "--harmful_eval", str(root / "eval.jsonl"), "--workdir", str(tmp_path / "cache"),
            "--methods", ",".join(["sft", *new]), "--seeds", "42", "--n", "16", "--epochs", "1", "--rank", "4",
            "--harm_rank", "4", "--harm_n", "16", "--harm_epochs", "1", "--lam_harm", "5", "--lam_normalized", "3",
            "--safety_n", "16", "--safety_epochs", "1", "--safemerge_threshold", "1.0", "--restore_harmful", "8", "--restore_retain", "8",
            "--restore_steps", "2", "--target_margin", "0.01", "--trust_region", "0.05", "--cg_max_iter", "3", "--judges", "keyword", "--eval_benign", "2", "--eval_task",
            "4", "--max_new_tokens", "4", "--task_max_new_tokens", "2", "--eval_batch_size", "4", "--replicates",
            "100", "--out_json", str(tmp_path / "res" / "safety.json"),
            "--out_md", str(tmp_path / "res" / "safety.md")]  # fmt: skip
    summary = sb.main(argv)
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"sft", *new}
    for method, row in rows.items():
        assert all(math.isfinite(row[k]) for k in ("hs", "fa", "margin")), (method, row)
        assert row["d_hs_vs_sft"] is not None
    extra = {m: summary["details"][m]["extra"]["42"] for m in rows}
    # asft_harm: the reference fine-tune saw the restoration pairs only (seed 0, lam 0), never the attack file.
    (ref,) = [c for c in calls if "/harm_reference-seed0-" in _arg(c, "--model.adapter_output")]
    assert _arg(ref, "--data.harmful_data") == str(root / "harmful_restore.jsonl")
    assert _arg(ref, "--data.harmful_ratio") == "1.0" and _arg(ref, "--data.seed") == "0"
    (anchored,) = [c for c in calls if "/asft_harm-seed42-" in _arg(c, "--model.adapter_output")]
    harm_file = _arg(anchored, "--model.direction")
    assert load_direction(harm_file).reference == "harmful" and _arg(anchored, "--model.lam") == "5.0"
    # Its control: the same fit on the harmful subspace rotated with the row's seed (same rank, a random subspace).
    (control,) = [c for c in calls if "/asft_harm_rotated-seed42-" in _arg(c, "--model.adapter_output")]
    assert "--model.anchor=harm_subspace" in control and _arg(control, "--model.lam") == "5.0"
    rotated = load_direction(_arg(control, "--model.direction"))
    assert rotated.metadata["control"] == {"kind": "random_rotation", "seed": 42, "source": harm_file}
    assert rotated.reference == "harmful" and set(rotated.modules) == set(load_direction(harm_file).modules)
    # asft_normalized's control: the same normalized fit on the world's V rotated with the row's seed.
    (normalized,) = [c for c in calls if "/asft_normalized-seed42-" in _arg(c, "--model.adapter_output")]
    (n_control,) = [c for c in calls if "/asft_normalized_rotated-seed42-" in _arg(c, "--model.adapter_output")]
    for c in (normalized, n_control):
        assert "--model.anchor=normalized" in c and _arg(c, "--model.lam") == "3.0"
    assert _arg(normalized, "--model.direction") == str(root / "direction.safetensors")
    n_rotated = load_direction(_arg(n_control, "--model.direction"))
    assert n_rotated.metadata["control"] == {"kind": "random_rotation", "seed": 42,
                                             "source": str(root / "direction.safetensors")}
    assert {(p["control"], p["method"], tuple(p["seeds"])) for p in summary["controls"]} == {
        ("asft_harm_rotated", "asft_harm", (42,)), ("asft_normalized_rotated", "asft_normalized", (42,))}
    info = extra["asft_harm"]["harm_reference"]
    assert (info["split"], info["file"], info["pairs"], info["rank"]) == (
        "harmful_restore", "harmful_restore.jsonl", 16, 4)
    # Restorations: the default row and L-BFGS restore with the restoration split, the bound with the attack's.
    assert extra["sft_restore_curvature"]["restore_split"] == "harmful_restore.jsonl"
    assert (extra["sft_restore_lbfgs"]["restore_split"], extra["sft_restore_lbfgs"]["solver"]) == (
        "harmful_restore.jsonl", "lbfgs")
    bound = extra["sft_restore_curvature_attack"]
    assert (bound["restore_split"], bound["solver"]) == ("harmful.jsonl", "fisher")
    # Post hoc: RESTA adds V to every module; SafeMERGE merges (threshold 1: every module) with the refusal adapter.
    assert extra["resta"]["resta_gamma"] == 1.0 and extra["resta"]["resta_modules"] > 0
    assert extra["safemerge"]["merged"] > 0 and extra["safemerge"]["safety_adapter"]["file"] == "refusals.jsonl"
    (safety,) = [c for c in calls if "/safety_reference-seed0-" in _arg(c, "--model.adapter_output")]
    assert _arg(safety, "--data.harmful_data") == str(root / "refusals.jsonl")
    md = (tmp_path / "res" / "safety.md").read_text()
    assert "restored with harmful.jsonl, solver fisher" in md and "harmful reference from harmful_restore.jsonl" in md
    assert "rotated at random (seed 42)" in md and "| asft_harm_rotated | asft_harm | 1 |" in md
    # Resume: nothing is trained, extracted, restored, edited or evaluated again.
    for target in ("asft_lightning.cli.lightning_cli", "asft_lightning.evaluate.evaluate",
                   "asft_lightning.direction.extract_direction", "asft_lightning.restore_command.restore_adapter",
                   "asft_lightning.resta.resta", "asft_lightning.safemerge.safemerge"):
        monkeypatch.setattr(target, lambda *a, target=target, **kw: pytest.fail(f"{target} ran again"))
    assert sb.main(argv)["rows"] == summary["rows"]
