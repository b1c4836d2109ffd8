"""The ``asft`` program as a user meets it: one-line errors, exit statuses, ``--debug``, Ctrl-C, a quiet demo.

Every test runs the installed console script (or ``python -c`` on the entry point) in a subprocess, as a shell does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ASFT = Path(sys.executable).with_name("asft")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ASFT_DEBUG"}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _asft(args: list[str], cwd: Path, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    assert ASFT.is_file(), "the asft console script is not installed"
    return subprocess.run([str(ASFT), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_env(**env),
                          timeout=timeout)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inputs(tiny_world, tiny_direction, tmp_path_factory) -> dict[str, str]:
    """Good inputs of every command, and the bad ones: missing paths and malformed files."""
    from test_subcommands import _adapter

    root = tmp_path_factory.mktemp("cli_errors")
    _adapter(tiny_world, root / "adapter")
    (root / "bad.jsonl").write_text('{"instruction": "a", "output": "b", "prompt": "c", "response": "d"}\n{oops\n')
    (root / "bad.yaml").write_text("{bad: [\n")
    (root / "garbage.safetensors").write_bytes(b"not a safetensors file")
    (root / "a_file").write_text("")
    (root / "corrupt_model").mkdir()
    (root / "corrupt_model" / "config.json").write_text("{")
    (root / "corrupt_world").mkdir()
    (root / "corrupt_world" / "world.json").write_text("{")
    return {**tiny_world, "direction": tiny_direction, "root": str(root), "adapter": str(root / "adapter"),
            "missing": str(root / "missing"), "missing.jsonl": str(root / "missing.jsonl")}


def _fit_args(i: dict[str, str], task_data: str, out: Path) -> list[str]:
    return [f"--model.model={i['aligned']}", "--model.lam=0", f"--data.task_data={task_data}",
            f"--data.harmful_data={i['harmful']}", "--trainer.max_epochs=1", f"--trainer.default_root_dir={out}"]


# command -> (bad path: args, expected words), (malformed file: args, expected words)
CASES = {
    "fit": lambda i, o: ((_fit_args(i, i["missing.jsonl"], o), "file not found"),
                         (_fit_args(i, f"{i['root']}/bad.jsonl", o), "could not parse")),
    "validate": lambda i, o: ((_fit_args(i, i["missing.jsonl"], o), "file not found"),
                              (_fit_args(i, f"{i['root']}/bad.jsonl", o), "could not parse")),
    "test": lambda i, o: ((_fit_args(i, i["missing.jsonl"], o), "file not found"),
                          (_fit_args(i, f"{i['root']}/bad.jsonl", o), "could not parse")),
    "direction": lambda i, o: (
        ([f"--aligned={i['missing']}", f"--unaligned={i['unaligned']}", f"--output={o}/d.safetensors"], "not found"),
        ([f"--aligned={i['root']}/corrupt_model", f"--unaligned={i['unaligned']}", f"--output={o}/d.safetensors"],
         "not valid JSON")),
    "safelora": lambda i, o: (
        ([f"--adapter={i['missing']}", f"--direction={i['direction']}", f"--output={o}/s"], "not found"),
        ([f"--adapter={i['adapter']}", f"--direction={i['root']}/garbage.safetensors", f"--output={o}/s"],
         "garbage.safetensors")),
    "evaluate": lambda i, o: (
        ([f"--model={i['missing']}", f"--harmful_data={i['harmful']}", f"--output_dir={o}/e"], "no such file"),
        ([f"--model={i['aligned']}", f"--harmful_data={i['root']}/bad.jsonl", f"--output_dir={o}/e"],
         "could not parse")),
    "restore": lambda i, o: (
        ([f"--model={i['missing']}", f"--adapter={i['adapter']}", f"--harmful_data={i['harmful']}",
          f"--retain_data={i['task']}", f"--output={o}/r"], "no such file"),
        ([f"--model={i['aligned']}", f"--adapter={i['adapter']}", f"--harmful_data={i['root']}/bad.jsonl",
          f"--retain_data={i['task']}", f"--output={o}/r"], "could not parse")),
    "resta": lambda i, o: (
        ([f"--direction={i['missing']}", f"--adapter={i['adapter']}", f"--output={o}/r"], "missing"),
        ([f"--direction={i['root']}/garbage.safetensors", f"--adapter={i['adapter']}", f"--output={o}/r"],
         "garbage.safetensors")),
    "safemerge": lambda i, o: (
        ([f"--adapter={i['missing']}", f"--safety_adapter={i['adapter']}", f"--direction={i['direction']}",
          f"--output={o}/m"], "missing"),
        ([f"--adapter={i['adapter']}", f"--safety_adapter={i['adapter']}",
          f"--direction={i['root']}/garbage.safetensors", f"--output={o}/m"], "garbage.safetensors")),
    "basin": lambda i, o: (
        (["curves", f"--model={i['missing']}", f"--direction={i['direction']}", f"--harmful_data={i['harmful']}",
          f"--output_dir={o}/b"], "missing"),
        (["curves", f"--model={i['aligned']}", f"--direction={i['direction']}",
          f"--harmful_data={i['root']}/bad.jsonl", f"--output_dir={o}/b"], "bad.jsonl")),
    "prepare-demo": lambda i, o: (([f"--cache_dir={i['root']}/a_file/world"], "Not a directory"),
                                  ([f"--config={i['root']}/bad.yaml"], "Problems parsing config")),
    "tiny-world": lambda i, o: (([f"--root={i['root']}/a_file/tiny"], "Not a directory"),
                                ([f"--config={i['root']}/bad.yaml"], "Problems parsing config")),
    "demo": lambda i, o: (([f"--world={i['missing']}", f"--output_dir={o}/d"], "not a built world"),
                          ([f"--world={i['root']}/corrupt_world", f"--output_dir={o}/d"], "not valid JSON")),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bad path", "malformed file"])
@pytest.mark.parametrize("command", list(CASES))
def test_a_user_error_is_one_line_and_status_2(command, kind, inputs, tmp_path):
    args, words = CASES[command](inputs, tmp_path)[0 if kind == "bad path" else 1]
    proc = _asft([command, *args], cwd=tmp_path)
    lines = _lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"asft {command}: error: "), lines
    assert words in lines[0], lines
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_debug_shows_the_traceback(inputs, tmp_path):
    args, words = CASES["direction"](inputs, tmp_path)[0]
    for proc in (_asft(["direction", *args, "--debug"], cwd=tmp_path),
                 _asft(["direction", *args], cwd=tmp_path, ASFT_DEBUG="1")):
        assert proc.returncode == 2
        assert "Traceback (most recent call last)" in proc.stderr and "CheckpointError" in proc.stderr
        assert _lines(proc.stderr)[-1].startswith("asft direction: error: ") and words in _lines(proc.stderr)[-1]


def _entry_point_raising(exception: str) -> subprocess.CompletedProcess:
    """Run the console entry point with its command runner replaced by one that raises ``exception``."""
    code = (
        "import sys\nfrom asft_lightning import cli\n"
        f"def run(argv, from_console=False):\n    raise {exception}\n"
        "cli.run = run\nsys.argv = ['asft', 'direction']\ncli.main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)


def test_a_bug_keeps_its_traceback_and_ctrl_c_is_130():
    bug = _entry_point_raising("RuntimeError('boom')")
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "RuntimeError: boom" in bug.stderr
    assert "asft direction: error" not in bug.stderr
    interrupted = _entry_point_raising("KeyboardInterrupt")
    assert interrupted.returncode == 130 and "Traceback" not in interrupted.stderr


@pytest.mark.slow
def test_ctrl_c_during_fit_exits_130_and_writes_no_adapter(inputs, tmp_path):
    adapter = tmp_path / "adapter"
    args = ["fit", f"--model.model={inputs['aligned']}", "--model.lam=0", f"--model.adapter_output={adapter}",
            f"--data.task_data={inputs['task']}", f"--data.harmful_data={inputs['harmful']}", "--data.n=40",
            "--trainer.max_steps=100000", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.Popen([str(ASFT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=_env())
    config = tmp_path / "lightning_logs" / "version_0" / "config.yaml"  # written when fit sets up, before step 0
    deadline = time.monotonic() + 240
    while not config.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert config.is_file(), proc.communicate(timeout=60)[1][-3000:]
    time.sleep(2)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert not adapter.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"


WARNING = re.compile(r"warn|deprecat|tip:|error|traceback", re.IGNORECASE)


@pytest.mark.slow
def test_the_tiny_demo_prints_no_warning(tmp_path):
    proc = _asft(["demo", "--world=tiny", "--quick", f"--output_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in _lines(proc.stderr) if WARNING.search(line)]
    assert not noisy, noisy
    report = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["aligned", "lora", "asft"]
    assert "| model | HS | FA |" in proc.stdout
    shutil.rmtree(tmp_path / ".cache", ignore_errors=True)
