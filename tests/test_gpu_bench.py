"""``benchmarks/gpu_bench.py``: a tiny CPU smoke run gives the three variants, and without CUDA it skips cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.py"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=300)


def test_cpu_smoke_run_reports_three_variants(tmp_path):
    out = tmp_path / "gpu.md"
    proc = _run(["--device", "cpu", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert report.strip() in proc.stdout  # (DeepSpeed may log a line to stdout before it)
    assert "CPU smoke test, not a result" in report
    assert "| variant | tokens/s | ratio vs plain LoRA | peak memory MiB |" in report
    rows = {}
    for line in report.splitlines():
        m = re.fullmatch(r"\| (plain LoRA|AsFT \(anchor\)|published dense) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|",
                         line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert set(rows) == {"plain LoRA", "AsFT (anchor)", "published dense"}, report
    assert all(tps > 0 for tps, _ in rows.values())
    assert rows["plain LoRA"][1] == 1.0
    # the anchor and the dense form computed the same penalty (same seed, same batches, float32)
    m = re.search(r"relative difference ([0-9.e+-]+)", report)
    assert m and float(m.group(1)) < 1e-3, report


def test_skips_cleanly_without_cuda():
    proc = _run(["--preset", "tiny"], CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "no CUDA device: skipped"
