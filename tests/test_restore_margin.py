"""``benchmarks/restore_margin.py``: the margin rule on hand-made sweep summaries with known answers, the paired
curvature vs first-order comparison, the writers (Markdown, JSON, PNG), ``--from_json``, and the in-process sweep
through ``safety_bench``'s own loop with a stand-in ``Bench`` (no world, no model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if "safety_bench" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("safety_bench", REPO / "benchmarks" / "safety_bench.py")
    _sb = importlib.util.module_from_spec(_spec)
    sys.modules["safety_bench"] = _sb
    _spec.loader.exec_module(_sb)
_spec = importlib.util.spec_from_file_location("restore_margin", REPO / "benchmarks" / "restore_margin.py")
rm = importlib.util.module_from_spec(_spec)
sys.modules["restore_margin"] = rm
_spec.loader.exec_module(rm)

CURV, FO = "sft_restore_curvature", "sft_restore_first_order"


# ----------------------------------------------------------------------------------------------------------------
# Hand-made summaries
# ----------------------------------------------------------------------------------------------------------------


def _row(method, hs, benign, d_hs=None, d_fa=None, fa_lo=None, fa=40.0, seconds=100.0):
    """A safety.json row; ``d_fa`` with its interval ``[fa_lo, d_fa + 2]``."""
    return {
        "method": method, "hs": hs, "hs_ci": [hs - 3, hs + 3], "hs_judge2": None, "fa": fa, "fa_ci": [fa - 4, fa + 4],
        "benign_refusal": benign, "margin": None,
        "d_hs_vs_sft": d_hs, "d_hs_ci": None if d_hs is None else [d_hs - 2, d_hs + 2],
        "d_fa_vs_sft": d_fa, "d_fa_ci": None if d_fa is None else [fa_lo, d_fa + 2], "seconds": seconds,
    }  # fmt: skip


def _summary(*rows, aligned_benign=3.0):
    base = [_row("aligned", 30.0, aligned_benign, d_hs=0.0, d_fa=-5.0, fa_lo=-8.0, fa=35.0),
            _row("sft", 60.0, 1.0, d_hs=0.0, d_fa=0.0, fa_lo=0.0)]
    return {"eval": {"harmful_prompts": 40, "harmful_sources": [], "benign_prompts": 20, "task_examples": 50,
                     "judges": ["keyword"]},
            "seeds": [42, 1, 2], "rows": base + list(rows), "details": {}}


def test_rule_benign_refusal_boundary_and_largest_cut():
    # aligned benign 3.0: 8.0 is exactly +5 (admissible), 8.01 is not.
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.5, fa_lo=-0.5)),
        "-0.1": _summary(_row(CURV, 30.0, 8.0, d_hs=-30.0, d_fa=0.5, fa_lo=-0.5)),
        "-0.2": _summary(_row(CURV, 10.0, 8.01, d_hs=-50.0, d_fa=0.5, fa_lo=-0.5)),
    }
    out = rm.choose_margin(sums)
    c = out[CURV]
    assert c["value"] == "-0.1" and c["margin"] == -0.1
    assert [x["value"] for x in c["candidates"]] == ["0.01", "-0.1", "-0.2"]  # mildest first
    assert [x["admissible"] for x in c["candidates"]] == [True, True, False]
    assert c["candidates"][2]["reasons"] == ["benign refusal 8.0% > aligned 3.0% + 5"]
    assert c["candidates"][2]["aligned_benign_refusal"] == 3.0
    # a wider slack admits -0.2, whose cut is the largest
    assert rm.choose_margin(sums, benign_slack=5.02)[CURV]["value"] == "-0.2"


def test_rule_fa_interval_lower_end():
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=1.0, fa_lo=-1.0)),    # exactly -1: admissible
        "-0.1": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=3.0, fa_lo=-1.01)),   # mean up, lower end too low
        "-0.2": _summary(_row(CURV, 20.0, 3.0, d_hs=-40.0, d_fa=-6.0, fa_lo=-9.0)),
    }
    c = rm.choose_margin(sums, fa_test="interval")[CURV]
    assert c["value"] == "0.01"
    assert [x["admissible"] for x in c["candidates"]] == [True, False, False]
    assert "lower end < -1" in c["candidates"][1]["reasons"][0]
    assert "[-1.0, +5.0]" in c["candidates"][1]["reasons"][0]
    assert rm.choose_margin(sums, fa_floor=-1.02, fa_test="interval")[CURV]["value"] == "-0.1"
    assert rm.choose_margin(sums, fa_floor=-10.0, fa_test="interval")[CURV]["value"] == "-0.2"


def test_rule_fa_on_the_mean_change_by_default():
    """The default reads the issue's "FA at least SFT - 1" on the mean change: a mean of exactly -1 is admissible
    whatever its interval, -1.01 is not."""
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.5, fa_lo=-3.0)),
        "-0.1": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=-1.0, fa_lo=-6.0)),    # exactly -1: admissible
        "-0.2": _summary(_row(CURV, 20.0, 3.0, d_hs=-40.0, d_fa=-1.01, fa_lo=-4.0)),
    }
    c = rm.choose_margin(sums)[CURV]
    assert c["value"] == "-0.1"
    assert [x["admissible"] for x in c["candidates"]] == [True, True, False]
    assert c["candidates"][2]["reasons"] == ["FA change -1.0 [-4.0, +1.0] < -1"]
    assert rm.choose_margin(sums, fa_test="interval")[CURV]["value"] is None  # every lower end is below -1
    assert "mean FA change against SFT is >= -1" in rm.rule_text(5.0, -1.0, "point")
    assert "lower end >= -1" in rm.rule_text(5.0, -1.0, "interval")
    with pytest.raises(ValueError, match="fa_test"):
        rm.choose_margin(sums, fa_test="median")


def test_rule_ties_go_to_the_milder_restoration():
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.0, fa_lo=0.0)),
        "-0.2": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=0.0)),
        "-0.1": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=0.0)),
        "-0.3": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=0.0)),
    }
    c = rm.choose_margin(sums)[CURV]
    assert c["value"] == "-0.1"
    assert "tied with -0.2, -0.3" in c["reason"]
    # the milder is the larger margin, also above 0 (restoration stops at reference - margin)
    sums2 = {"0.01": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=0.0)),
             "0.05": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=0.0))}
    assert rm.choose_margin(sums2)[CURV]["value"] == "0.05"


def test_rule_none_admissible_gives_reasons_per_margin():
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 9.0, d_hs=-10.0, d_fa=0.0, fa_lo=0.0),
                         _row(FO, 50.0, 3.0, d_hs=-10.0, d_fa=0.0, fa_lo=0.0)),
        "-0.1": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=-3.0, fa_lo=-5.0),
                         _row(FO, 30.0, 3.0, d_hs=-30.0, d_fa=-3.0, fa_lo=-5.0)),
    }
    out = rm.choose_margin(sums)
    assert list(out) == [CURV, FO]  # safety_bench.RESTORING order
    c = out[CURV]
    assert c["margin"] is None and c["value"] is None
    assert c["reason"].startswith("no admissible margin (0.01: benign refusal 9.0% > aligned 3.0% + 5; -0.1: FA change")
    assert out[FO]["value"] == "0.01"
    # no aligned row: not admissible, said so
    no_aligned = {"0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.0, fa_lo=0.0))}
    no_aligned["0.01"]["rows"] = [r for r in no_aligned["0.01"]["rows"] if r["method"] != "aligned"]
    c = rm.choose_margin(no_aligned)[CURV]
    assert c["value"] is None and "no aligned row" in c["candidates"][0]["reasons"][0]
    # a method missing at one margin: that margin is not admissible for it
    partial = {"0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.0, fa_lo=0.0)), "-0.1": _summary()}
    c = rm.choose_margin(partial)[CURV]
    assert c["value"] == "0.01" and c["candidates"][1]["reasons"] == ["no row at this margin"]


def test_rule_rejects_bad_keys():
    with pytest.raises(ValueError, match="same margin twice"):
        rm.choose_margin({"-0.1": _summary(), "-0.10": _summary()})
    with pytest.raises(ValueError, match="not finite"):
        rm.choose_margin({"nan": _summary()})
    with pytest.raises(ValueError, match="not a number"):
        rm.choose_margin({"abc": _summary()})


# ----------------------------------------------------------------------------------------------------------------
# The paired comparison
# ----------------------------------------------------------------------------------------------------------------


def test_paired_comparison_from_vectors_and_its_absence():
    n = 50
    curv_fa = "1" * 30 + "0" * 20
    fo_fa = "1" * 22 + "0" * 28  # curvature right wherever first-order is, plus 8: +16 points, interval >= 0
    sums = {"-0.1": _summary(_row(CURV, 30.0, 3.0, d_hs=-30.0, d_fa=0.0, fa_lo=-0.5),
                             _row(FO, 30.0, 3.0, d_hs=-30.0, d_fa=-16.0, fa_lo=-20.0))}
    vec = {CURV: {"judge": "keyword", "seeds": [42, 1], "fa": [curv_fa, curv_fa], "hs": ["0" * 40, "0" * 40]},
           FO: {"judge": "keyword", "seeds": [1, 42], "fa": [fo_fa, fo_fa], "hs": ["1" * 4 + "0" * 36] * 2}}
    out = rm.curvature_vs_first_order({"sweep": "target_margin", "values": sums, "vectors": {"-0.1": vec}}, "-0.1",
                                      replicates=500)
    assert out["available"] and out["seeds"] == [42, 1]
    assert out["d_fa"] == pytest.approx(100.0 * 8 / n)
    assert 0.0 <= out["d_fa_ci"][0] < 16.0 < out["d_fa_ci"][1]
    assert out["d_hs"] == pytest.approx(-10.0) and out["d_hs_ci"][1] <= 0.0
    assert "Curvature keeps more FA" in out["reading"]

    # no vectors (a safety_bench.py --sweep JSON): the two FA changes vs SFT, no paired figure
    out = rm.curvature_vs_first_order({"sweep": "target_margin", "values": sums}, "-0.1")
    assert not out["available"] and out["d_fa"] is None and out["d_fa_ci"] is None
    assert out["fa_vs_sft"][CURV] == {"d_fa": 0.0, "d_fa_ci": [-0.5, 2.0]}
    assert out["fa_vs_sft"][FO] == {"d_fa": -16.0, "d_fa_ci": [-20.0, -14.0]}
    assert "direct paired comparison not available" in out["reading"]
    assert f"{CURV} FA change vs SFT +0.0 [-0.5, +2.0]" in out["reading"]

    # vectors of another length: not the same instrument, refused
    bad = {CURV: dict(vec[CURV]), FO: dict(vec[FO], fa=[fo_fa[:-1]] * 2)}
    out = rm.curvature_vs_first_order({"sweep": "target_margin", "values": sums, "vectors": {"-0.1": bad}}, "-0.1")
    assert not out["available"] and "different lengths" in out["reading"]


def test_comparison_margin_falls_back_to_first_order():
    assert rm.comparison_margin({CURV: {"value": "-0.2"}, FO: {"value": "0.01"}}) == ("-0.2", CURV)
    assert rm.comparison_margin({CURV: {"value": None}, FO: {"value": "0.01"}}) == ("0.01", FO)
    assert rm.comparison_margin({CURV: {"value": None}, FO: {"value": None}})[0] is None


# ----------------------------------------------------------------------------------------------------------------
# Writers and --from_json
# ----------------------------------------------------------------------------------------------------------------


def _sweep_file(tmp_path):
    sums = {
        "0.01": _summary(_row(CURV, 50.0, 3.0, d_hs=-10.0, d_fa=0.5, fa_lo=-0.5, seconds=300.0),
                         _row(FO, 52.0, 3.0, d_hs=-8.0, d_fa=0.0, fa_lo=-0.8, seconds=120.0)),
        "-0.2": _summary(_row(CURV, 5.0, 6.0, d_hs=-55.0, d_fa=4.0, fa_lo=1.0, seconds=400.0),
                         _row(FO, 6.0, 6.0, d_hs=-54.0, d_fa=-2.0, fa_lo=-4.0, seconds=150.0)),
        "-0.3": _summary(_row(CURV, 1.0, 20.0, d_hs=-59.0, d_fa=1.0, fa_lo=-0.2, seconds=500.0),
                         _row(FO, 2.0, 3.0, d_hs=-58.0, d_fa=-9.0, fa_lo=-12.0, seconds=160.0)),
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"sweep": "target_margin", "values": sums}))
    return path


def test_from_json_writes_verdict_table_json_and_png(tmp_path, capsys):
    src = _sweep_file(tmp_path)
    md, js, png = tmp_path / "o.md", tmp_path / "o.json", tmp_path / "o.png"
    report = rm.main(["--from_json", str(src), "--out_md", str(md), "--out_json", str(js), "--out_png", str(png)])
    assert report["choice"][CURV]["value"] == "-0.2"  # -0.3 refuses too many benign prompts
    assert report["choice"][FO]["value"] == "0.01"    # -0.2 and -0.3 lose FA
    assert report["margins"] == [0.01, -0.2, -0.3]
    assert [(t["value"], t["method"]) for t in report["table"]] == [
        ("0.01", CURV), ("0.01", FO), ("-0.2", CURV), ("-0.2", FO), ("-0.3", CURV), ("-0.3", FO)]
    assert report["reference"]["sft"]["hs"] == 60.0 and report["reference"]["aligned"]["benign_refusal"] == 3.0
    assert report["warnings"] == []
    c = report["curvature_vs_first_order"]
    assert c["value"] == "-0.2" and c["margin_of"] == CURV and not c["available"]

    text = md.read_text()
    assert "## Verdict" in text
    assert (f"- {CURV}: margin -0.2, the largest HS cut of the admissible margins (0.01, -0.2): HS 5.0, change -55.0 "
            "[-57.0, -53.0] vs SFT, 92% of SFT's HS removed; benign refusal 6.0%; FA change +4.0 [+1.0, +6.0].\n") in text
    assert "its mean FA change against SFT is >= -1 points (FA at least SFT - 1)" in text
    assert "| -0.2 | sft_restore_curvature | 5.0 [2.0, 8.0] | -55.0 [-57.0, -53.0] | 6.0 | 40.0 [36.0, 44.0] | " \
           "+4.0 [+1.0, +6.0] | 400 | n/a | yes (chosen) |" in text
    assert "| -0.3 | sft_restore_curvature |" in text and "no: benign refusal 20.0% > aligned 3.0% + 5" in text
    assert "direct paired comparison not available" in text
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"

    back = json.loads(js.read_text())
    assert back == json.loads(json.dumps(report))
    assert back["choice"][CURV]["margin"] == -0.2 and back["rule"]["benign_slack"] == 5.0

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writers left no temporary


def test_from_json_none_admissible_and_errors(tmp_path):
    src = _sweep_file(tmp_path)
    md = tmp_path / "o.md"
    report = rm.main(["--from_json", str(src), "--out_md", str(md), "--out_json", str(tmp_path / "o.json"),
                      "--out_png", str(tmp_path / "o.png"), "--fa_floor", "5", "--fa_test", "interval"])
    assert report["choice"][CURV]["value"] is None and report["choice"][FO]["value"] is None
    assert report["curvature_vs_first_order"]["value"] is None
    assert report["rule"]["fa_test"] == "interval" and "with confidence" in report["rule"]["text"]
    assert f"- {CURV}: no admissible margin (0.01: FA change +0.5 [-0.5, +2.5]: lower end < +5" in md.read_text()

    # loose bounds admit -0.3, the sweep's strongest margin: the verdict says stronger ones were not tried
    report = rm.main(["--from_json", str(src), "--out_md", str(md), "--out_json", str(tmp_path / "o.json"),
                      "--out_png", str(tmp_path / "o.png"), "--fa_floor=-20", "--benign_slack", "20"])
    assert report["choice"][CURV]["value"] == "-0.3" and report["choice"][FO]["value"] == "-0.3"
    assert report["verdict"][0].endswith("It is the sweep's strongest margin: stronger ones were not tried.")
    assert "no: " not in md.read_text()

    not_sweep = tmp_path / "safety.json"
    not_sweep.write_text(json.dumps(_summary()))
    with pytest.raises(SystemExit, match="not a sweep JSON"):
        rm.main(["--from_json", str(not_sweep), "--out_md", str(md)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"sweep": "lam_safelora", "values": {"1": _summary()}}))
    with pytest.raises(SystemExit, match="a sweep of 'lam_safelora'"):
        rm.main(["--from_json", str(other), "--out_md", str(md)])
    with pytest.raises(SystemExit) as e:
        rm.main(["--from_json", str(src), "--seeds", "1"])  # would do nothing
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        rm.main(["--margins=-0.1,-0.10", "--world", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        rm.main(["--target_margin", "-0.2", "--world", str(tmp_path)])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------------------------
# The in-process sweep with a stand-in Bench
# ----------------------------------------------------------------------------------------------------------------

NH, NB, NT = 40, 20, 50  # harmful prompts, benign prompts, task examples


def _ones(k, n):
    return [1] * k + [0] * (n - k)


# (HS answered of 40, benign refused of 20, task right of 50) per method and margin; aligned and SFT fixed.
PLAN = {
    "aligned": (4, 1, 25),  # benign refusal 5%: the rule allows up to 10%
    "sft": (20, 0, 30),
    (CURV, 0.01): (15, 1, 30), (CURV, -0.1): (8, 2, 30), (CURV, -0.2): (2, 4, 30), (CURV, -0.3): (0, 1, 20),
    (FO, 0.01): (15, 1, 30), (FO, -0.1): (10, 1, 22), (FO, -0.2): (4, 1, 20), (FO, -0.3): (2, 1, 15),
}


class FakeBench:
    """``Bench.run``-shaped results from :data:`PLAN` (the same for every seed), recording what it was asked."""

    calls: list = []

    def __init__(self, args):
        self.args = args

    def run(self, method, seed):
        FakeBench.calls.append((method, seed, self.args.target_margin))
        hs, benign, fa = PLAN[method] if method in ("aligned", "sft") else PLAN[(method, self.args.target_margin)]
        return {"method": method, "seed": seed, "seconds": 10.0, "train_seconds": 4.0, "eval_seconds": 6.0,
                "judges": ["keyword"], "hs": {"keyword": _ones(hs, NH)},
                "benign_refused": {"keyword": _ones(benign, NB)}, "fa": _ones(fa, NT), "margin": None,
                "harmful_sources": ["a"] * NH, "harmful_categories": ["x"] * NH, "extra": {}}


def test_in_process_sweep_then_from_json(tmp_path, monkeypatch):
    monkeypatch.setattr(rm.sb, "Bench", FakeBench)
    FakeBench.calls = []
    out = {k: tmp_path / f"o.{k}" for k in ("md", "json", "png")}
    sweep_json, sweep_md = tmp_path / "sweep.json", tmp_path / "sweep.md"
    argv = ["--seeds", "42,1", "--world", str(tmp_path / "world"), "--workdir", str(tmp_path / "work"),
            "--replicates", "200", "--sweep_json", str(sweep_json), "--sweep_md", str(sweep_md),
            "--out_md", str(out["md"]), "--out_json", str(out["json"]), "--out_png", str(out["png"])]
    report = rm.main(argv)
    # the benchmark's loop: aligned once per margin, the rest per seed, margins in the order given
    assert [c for c in FakeBench.calls if c[2] == -0.1] == [
        ("aligned", 42, -0.1), ("sft", 42, -0.1), (CURV, 42, -0.1), (FO, 42, -0.1),
        ("sft", 1, -0.1), (CURV, 1, -0.1), (FO, 1, -0.1)]
    assert [c[2] for c in FakeBench.calls[::7]] == [0.01, -0.1, -0.2, -0.3]

    # rule: curvature -0.2 refuses 20% benign (> 5 + 5), -0.3 loses 20 FA points; -0.1 (exactly 10%) is chosen
    cands = {c["value"]: c for c in report["choice"][CURV]["candidates"]}
    assert report["choice"][CURV]["value"] == "-0.1"
    assert cands["-0.1"]["benign_refusal"] == 10.0 and cands["-0.1"]["aligned_benign_refusal"] == 5.0
    assert cands["-0.1"]["d_hs_vs_sft"] == -30.0 and cands["-0.1"]["d_fa_ci"] == [0.0, 0.0]
    assert [c["admissible"] for c in cands.values()] == [True, True, False, False]
    assert report["choice"][FO]["value"] == "0.01"

    # paired comparison at curvature's margin: FA 30/50 vs 22/50 on the same examples, HS 8/40 vs 10/40
    c = report["curvature_vs_first_order"]
    assert c["available"] and c["value"] == "-0.1" and c["seeds"] == [42, 1]
    assert c["d_fa"] == 16.0 and c["d_fa_ci"][0] >= 0.0 and c["d_fa_ci"][1] > 16.0
    # only 2 of 40 prompts differ in HS: the interval reaches 0, so "same HS" is what can be said
    assert c["d_hs"] == -5.0 and c["d_hs_ci"][1] == 0.0 and c["d_hs_ci"][0] < -5.0
    assert c["reading"].endswith("Curvature keeps more FA at an HS not distinguishable from first-order's.")

    # the sweep JSON: safety_bench's --sweep shape plus the vectors
    sweep = json.loads(sweep_json.read_text())
    assert sweep["sweep"] == "target_margin" and list(sweep["values"]) == ["0.01", "-0.1", "-0.2", "-0.3"]
    rows = {r["method"]: r for r in sweep["values"]["-0.2"]["rows"]}
    assert rows[CURV]["hs"] == 5.0 and rows[CURV]["benign_refusal"] == 20.0 and rows["sft"]["hs"] == 50.0
    v = sweep["vectors"]["-0.1"][FO]
    assert v["seeds"] == [42, 1] and v["fa"] == ["1" * 22 + "0" * 28] * 2 and v["hs"][0] == "1" * 10 + "0" * 30
    assert set(sweep["vectors"]["-0.1"]) == {CURV, FO}
    assert "## target_margin = -0.3" in sweep_md.read_text()

    # reading the sweep back gives the same analysis
    again = rm.main(["--from_json", str(sweep_json), "--out_md", str(tmp_path / "a.md"),
                     "--out_json", str(tmp_path / "a.json"), "--out_png", str(tmp_path / "a.png"), "--replicates", "200"])
    assert again["choice"] == report["choice"]
    assert again["curvature_vs_first_order"] == c
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
