"""``asft demo`` end to end on the tiny world laid out as a real one: table, files, cache, bad input."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from asft_lightning.cli import main
from asft_lightning.demo import SETTINGS, WorldError, demo, load_world

os.environ["HF_HUB_OFFLINE"] = "1"

QUICK = SETTINGS["tiny"]["quick"]


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| model | HS | FA | benign refusal | time s |"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory) -> str:
    """A copy of the session's tiny world (not modified) completed into a demo world: eval files, manifest."""
    from asft_lightning.tiny import build_tiny_demo_world

    root = tmp_path_factory.mktemp("demo") / "world"
    shutil.copytree(Path(tiny_world["aligned"]).parent, root)
    build_tiny_demo_world(root)
    return str(root)


@pytest.fixture(scope="module")
def first(world, tmp_path_factory):
    """One quick demo run on the tiny world (through a world directory, as with the real one)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    start = time.perf_counter()
    report = demo(world=world, quick=True, output_dir=str(out), verbose=False)
    return report, out, time.perf_counter() - start


def test_tiny_world_manifest_has_the_real_worlds_paths(world):
    info = load_world(world)
    assert info["preset"] == "tiny"
    for key in ("aligned", "direction", "task_train", "task_test", "harmful_attack", "harmful_eval", "benign_eval"):
        assert Path(info["paths"][key]).exists(), key


def test_demo_writes_table_and_json(first):
    report, out, _ = first
    assert (out / "demo.md").is_file() and (out / "demo.json").is_file()
    assert json.loads((out / "demo.json").read_text()) == report
    rows = _table_rows((out / "demo.md").read_text())
    assert [r[0] for r in rows] == ["aligned", "plain LoRA (lam=0)", "AsFT (safelora, lam=1)"]
    assert [r["name"] for r in report["rows"]] == ["aligned", "lora", "asft"]
    for cells, row in zip(rows, report["rows"], strict=True):
        for cell, key in zip(cells[1:4], ("HS", "FA", "benign_refusal"), strict=True):
            assert 0.0 <= row[key] <= 100.0
            assert cell == f"{row[key]:.1f}"
        assert not row["cached"] and row["seconds"] > 0 and "(cached)" not in cells[4]
    assert report["table"] in (out / "demo.md").read_text()
    assert any("QUICK" in n for n in report["notes"]) and any("noise" in n.lower() for n in report["notes"])
    # both adapters, every evaluation's own files, and the cache records
    for row in report["rows"][1:]:
        assert (Path(row["adapter"]) / "adapter_model.safetensors").is_file()
        assert row["train_drift_ratio"] is not None
    assert len(list((out / "results").glob("*.json"))) == 3
    assert len(list((out / "runs").glob("*/fit.json"))) == 2
    # the evaluation subset is the first k rows of each file
    for row in report["rows"]:
        assert (row["harmful_prompts"], row["task_examples"], row["benign_prompts"]) == (
            QUICK["eval_harmful"], QUICK["eval_task"], QUICK["eval_benign"]
        )
        gens = [json.loads(x) for x in (Path(row["eval_dir"]) / "main" / "generations.jsonl").read_text().splitlines()]
        assert sorted(g["row"] for g in gens if g["source"] == "harmful") == list(range(QUICK["eval_harmful"]))
        assert sorted(g["row"] for g in gens if g["source"] == "task") == list(range(QUICK["eval_task"]))


def test_second_run_is_served_from_the_cache(first, world, capsys):
    report, out, seconds = first
    before = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    start = time.perf_counter()
    main(["demo", f"--world={world}", "--quick", f"--output_dir={out}"])  # the CLI, with the bare switch
    elapsed = time.perf_counter() - start
    again = json.loads((out / "demo.json").read_text())
    assert again["quick"] is True
    printed = capsys.readouterr().out
    assert elapsed < min(5.0, seconds / 2)
    assert all(r["cached"] for r in again["rows"])
    for a, b in zip(report["rows"], again["rows"], strict=True):
        assert (a["HS"], a["FA"], a["benign_refusal"], a["seconds"]) == (b["HS"], b["FA"], b["benign_refusal"], b["seconds"])
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == before
    rows = _table_rows(printed)
    assert len(rows) == 3 and all(r[4].endswith("(cached)") for r in rows)
    assert "QUICK setting" in printed and str(out / "demo.md") in printed


def test_other_projector_reuses_the_lora_run(first, world):
    """Only the AsFT row depends on the projector: a subspace run recomputes it and reuses the other two."""
    _, out, _ = first
    report = demo(world=world, quick=True, output_dir=str(out), projector="subspace", rank=4, lam=2.0, verbose=False)
    assert [r["cached"] for r in report["rows"]] == [True, True, False]
    assert report["rows"][2]["label"] == "AsFT (subspace k=4, lam=2)"
    assert 0.0 <= report["rows"][2]["HS"] <= 100.0
    assert list((out / "directions").glob("subspace-k4-*.safetensors"))


def test_a_directory_that_is_not_a_built_world(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(WorldError, match=rf"{missing}.*asft prepare-demo --cache_dir {missing}"):
        demo(world=str(missing), output_dir=str(tmp_path / "out"), verbose=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorldError, match=r"no world.json there.*asft prepare-demo --cache_dir"):
        main(["demo", f"--world={empty}", f"--output_dir={tmp_path / 'out'}"])
    (empty / "world.json").write_text(json.dumps({"format_version": 1, "stages": {}}))
    with pytest.raises(WorldError, match="has no 'paths'"):
        load_world(empty)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projector": "subspace", "sign_weight": 1.0}, "sign_weight > 0 needs the full direction"),
        ({"p": 1.5}, r"p must be in \[0, 1\]"),
        ({"eval_task": 0, "lam": -1.0}, "eval_task must be >= 1.*lam must be >= 0"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo(world=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out"), verbose=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--world", "--quick", "--projector", "--lam", "--sign_weight", "--eval_harmful", "--eval_task"):
        assert flag in text


def test_switches_work_without_a_value():
    from asft_lightning.demo import bare_flags

    assert bare_flags(["--quick"]) == ["--quick", "true"]
    assert bare_flags(["--quick", "--lam", "2"]) == ["--quick", "true", "--lam", "2"]
    assert bare_flags(["--quick", "false", "--force"]) == ["--quick", "false", "--force", "true"]
    assert bare_flags(["--quick=true", "--world", "tiny"]) == ["--quick=true", "--world", "tiny"]
