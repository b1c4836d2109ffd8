"""``benchmarks/safety_bench.py``: the summary over seeds on hand-made rows with known statistics."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("safety_bench", REPO / "benchmarks" / "safety_bench.py")
sb = importlib.util.module_from_spec(_spec)
sys.modules["safety_bench"] = sb
_spec.loader.exec_module(sb)


def _row(seed: int, method: str, hs: float, fa: float):
    return (f"seed={seed}", method, {"HS": hs, "FA": fa})


def test_seed_summary_means_sds_and_paired_changes():
    rows = [
        _row(1, "sft", 30.0, 40.0), _row(1, "asft", 24.0, 41.0),
        _row(2, "sft", 20.0, 50.0), _row(2, "asft", 18.0, 47.0),
        _row(3, "sft", 25.0, 45.0), _row(3, "asft", 20.0, 45.0),
        _row(1, "aligned", 6.0, 22.0),  # one seed: no sd
        _row(4, "other", 10.0, 10.0),  # no SFT of seed 4: no paired change
    ]
    table = {line.split(" | ")[0].strip("| "): line for line in sb.seed_summary(rows) if line.startswith("| ")}
    # sft: HS mean 25, sd 5; FA mean 45, sd 5.
    assert table["sft"] == "| sft | 3 | 25.0 ± 5.0 | 45.0 ± 5.0 |  |  |  |"
    # asft: HS 24/18/20 -> mean 20.67, sd 3.06; FA 41/47/45 -> 44.33, 3.06; HS change -6/-2/-5 -> -4.33 ± 2.08,
    # FA change +1/-3/0 -> -0.67 ± 2.08; cut 13/75 = 17%.
    assert table["asft"] == "| asft | 3 | 20.7 ± 3.1 | 44.3 ± 3.1 | -4.3 ± 2.1 | -0.7 ± 2.1 | 17% |"
    assert table["aligned"] == "| aligned | 1 | 6.0 | 22.0 | -24.0 | -18.0 | 80% |"
    assert table["other"] == "| other | 1 | 10.0 | 10.0 |  |  |  |"


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
