"""``benchmarks/anchor_tradeoff.py``: the trade-off points, the target's verdict, unswept rows collapsed, the seed
check and the writers, on hand-made safety benchmark summaries with known answers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("anchor_tradeoff", REPO / "benchmarks" / "anchor_tradeoff.py")
at = importlib.util.module_from_spec(_spec)
sys.modules["anchor_tradeoff"] = at
_spec.loader.exec_module(at)


def _row(method, hs, d_hs, d_fa, fa_lo, benign=5.0):
    return {"method": method, "hs": hs, "hs_ci": [hs - 3, hs + 3], "hs_judge2": None, "fa": 40.0,
            "fa_ci": [36.0, 44.0], "benign_refusal": benign, "margin": None, "d_hs_vs_sft": d_hs,
            "d_hs_ci": [d_hs - 2, d_hs + 2], "d_fa_vs_sft": d_fa, "d_fa_ci": [fa_lo, d_fa + 2], "seconds": 1.0}


def _summary(rows, seeds=(42, 1, 2)):
    base = [_row("aligned", 16.0, -34.0, -19.0, -24.0), _row("sft", 50.0, 0.0, 0.0, 0.0)]
    return {"eval": {}, "seeds": list(seeds), "rows": base + rows}


def _sweep():
    control = _row("asft_rotated", 44.0, -6.0, -0.4, -2.6)
    return {"sweep": "lam_inside", "values": {
        "100": _summary([control, _row("asft_inside", 30.0, -20.0, 0.5, -0.9)]),
        "1000": _summary([control, _row("asft_inside", 14.0, -36.0, 0.0, -0.8)]),
        "5000": _summary([control, _row("asft_inside", 10.0, -40.0, -3.0, -6.0)]),
    }}


def test_points_cut_and_target():
    report = at.collect([("", _sweep(), "sweep.json")])
    got = {(p["method"], p["strength"]): p for p in report["points"]}
    # the control is the same at every lam_inside: one point, no strength
    assert sorted(got) == [("asft_inside", "lam_inside=100"), ("asft_inside", "lam_inside=1000"),
                           ("asft_inside", "lam_inside=5000"), ("asft_rotated", "")]
    assert report["sft"] == {"hs": 50.0, "seeds": [42, 1, 2]}
    assert got[("asft_inside", "lam_inside=100")]["hs_cut"] == pytest.approx(0.40)
    assert got[("asft_inside", "lam_inside=1000")]["hs_cut"] == pytest.approx(0.72)
    # 72% cut with the FA interval's lower end -0.8: met; 80% with -6.0: not; 40%: not
    assert [got[("asft_inside", f"lam_inside={v}")]["meets_target"] for v in (100, 1000, 5000)] == [False, True, False]
    assert got[("asft_rotated", "")]["meets_target"] is False
    text = at.render_markdown(report)
    assert "1 of 4 points meet the target." in text
    assert "| asft_inside | lam_inside=1000 | 14.0 | -36.0 [-38.0, -34.0] | 72% | +0.0 [-0.8, +2.0] | 5.0 | yes |" in text


def test_plain_file_label_method_filter_and_seed_check(tmp_path):
    plain = _summary([_row("asft_inside", 37.0, -13.0, 0.0, -3.0), _row("resta", 43.0, -7.0, -0.2, -2.3)])
    report = at.collect([("lam_inside=100", plain, "a.json")], methods=["asft_inside"])
    assert [(p["method"], p["strength"]) for p in report["points"]] == [("asft_inside", "lam_inside=100")]
    with pytest.raises(ValueError, match=r"b\.json .*seeds \[42\] differ"):
        at.collect([("", plain, "a.json"), ("", _summary([], seeds=(42,)), "b.json")])
    no_sft = {"seeds": [42], "rows": [_row("aligned", 16.0, 0.0, 0.0, 0.0)]}
    with pytest.raises(ValueError, match=r"c\.json .*no 'sft' row"):
        at.collect([("", no_sft, "c.json")])
    with pytest.raises(ValueError, match="neither a safety.json"):
        at.collect([("", {"x": 1}, "d.json")])


def test_duplicate_rows_and_controls():
    """The same cached row read from a sweep and from a plain file is one point; the tables' control comparisons
    come with their strength and the verdict, the same comparison from two files once."""
    harm = _row("asft_harm", 32.0, -18.0, -2.0, -8.0)
    control = {"control": "asft_harm_rotated", "method": "asft_harm", "seeds": [42, 1, 2], "d_hs": 9.5,
               "d_hs_ci": [6.0, 13.0], "d_fa": 0.5, "d_fa_ci": [-3.0, 4.0], "reading": "..."}
    plain = {**_summary([harm, _row("asft_harm_rotated", 41.5, -8.5, -1.5, -7.0)]), "controls": [control]}
    sweep = {"sweep": "lam_harm", "values": {"1000": _summary([harm]), "100": _summary([_row("asft_harm", 35.0,
                                                                                             -15.0, -1.0, -3.0)])}}
    report = at.collect([("", sweep, "s.json"), ("lam_harm=1000", plain, "c.json"), ("lam_harm=1000", plain, "d.json")])
    assert [(p["method"], p["strength"]) for p in report["points"]] == [
        ("asft_harm", "lam_harm=1000"), ("asft_harm", "lam_harm=100"), ("asft_harm_rotated", "lam_harm=1000")]
    (c,) = report["controls"]
    assert (c["strength"], c["outside_noise"], c["d_hs"]) == ("lam_harm=1000", True, 9.5)
    text = at.render_markdown(report)
    assert "| asft_harm_rotated | asft_harm | lam_harm=1000 | +9.5 [+6.0, +13.0] | +0.5 [-3.0, +4.0] | yes |" in text
    weak = {**plain, "controls": [{**control, "d_hs_ci": [-1.0, 13.0]}]}
    assert at.collect([("x", weak, "w.json")])["controls"][0]["outside_noise"] is False
    assert at.collect([("x", weak, "w.json")], methods=["asft_harm"])["controls"] == []  # the control not kept


def test_main_writes_outputs(tmp_path):
    src = tmp_path / "sweep.json"
    src.write_text(json.dumps(_sweep()))
    md, js, png = tmp_path / "t.md", tmp_path / "t.json", tmp_path / "t.png"
    report = at.main(["--input", str(src), "--out_md", str(md), "--out_json", str(js), "--out_png", str(png)])
    assert json.loads(js.read_text()) == json.loads(json.dumps(report))
    assert "| asft_inside | lam_inside=100 |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no rows of"):
        at.main(["--input", str(src), "--methods", "nothing"])
    with pytest.raises(SystemExit, match="missing.json"):
        at.main(["--input", str(tmp_path / "missing.json")])
