"""SafeMERGE (``asft safemerge``): the selection rule against a re-implementation of the authors' code, merged updates
against dense float64 formulas, PEFT's own linear merge for ``combination: factors``, bad input, the command line."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from asft_lightning.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from asft_lightning.direction import DirectionError, extract_direction, load_direction
from asft_lightning.errors import ArgumentError, OutputExistsError
from asft_lightning.safemerge import REPORT_NAME, SafeMergeError, flag_modules, merge_factors, safemerge

F64 = torch.float64
PREFIX = "base_model.model."
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


# ---------------------------------------------------------------- fixtures


def make_adapter(model_path: str, out: Path, seed: int, r: int = 4, alpha: float = 8, targets=None) -> str:
    """A PEFT LoRA adapter with random non-zero A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def direction(tiny_world, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dir") / "v.safetensors"
    extract_direction(
        tiny_world["aligned"], tiny_world["unaligned"], str(path), dtype="float64", hash_inputs=False
    )
    return str(path)


@pytest.fixture(scope="module")
def adapters(tiny_world, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "ft": make_adapter(tiny_world["aligned"], root / "ft", seed=1),
        "safe": make_adapter(tiny_world["aligned"], root / "safe", seed=2, alpha=16),
        "safe_r2": make_adapter(tiny_world["aligned"], root / "safe_r2", seed=3, r=2, alpha=4),
    }


def _factors(adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    state = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    cfg = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())
    out = {}
    for m in MODULES:
        a = state[f"{PREFIX}{m}.lora_A.weight"].double()
        b = state[f"{PREFIX}{m}.lora_B.weight"].double()
        out[m] = (a, b, cfg["lora_alpha"] / a.shape[0])
    return out


def _published_flags(adapter: str, direction: str, threshold: float) -> dict[str, bool]:
    """Which modules the authors' SafeMERGE code merges, re-implemented: dense ``C = V V^T / ||V||_F``,
    ``cosine_similarity`` of ``(C B) A`` and ``B A`` flattened, ``numpy.round(., 5)``, merged when ``< threshold``."""
    ds = load_direction(direction)
    flags = {}
    for m, (a, b, _) in _factors(adapter).items():
        v = ds.modules[m].direction.double()
        c = v @ v.mT / torch.linalg.matrix_norm(v)
        fw, ori = (c @ b) @ a, b @ a
        cos = torch.nn.functional.cosine_similarity(fw.reshape(1, -1), ori.reshape(1, -1)).item()
        flags[m] = bool(numpy.round(cos, 5) < threshold)
    return flags


def _cosines(adapter: str, direction: str) -> dict[str, float]:
    ds = load_direction(direction)
    out = {}
    for m, (a, b, _) in _factors(adapter).items():
        v = ds.modules[m].direction.double()
        c = v @ v.mT / torch.linalg.matrix_norm(v)
        out[m] = float(
            ((c @ b @ a) * (b @ a)).sum()
            / (torch.linalg.matrix_norm(c @ b @ a) * torch.linalg.matrix_norm(b @ a))
        )
    return out


def _snapshot(root: str | Path) -> dict[str, tuple[str, int]]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- pure functions


def test_flag_modules_published_rule():
    # 0.349996 rounds to 0.35, which is not < 0.35: published keeps it, strict merges it; a zero update has
    # cosine 0 under the published rule (merged), and is never merged under strict.
    cos = {"a": 0.2, "edge": 0.349996, "exact": 0.35, "b": 0.34999, "zero": float("nan"), "c": 0.9}
    assert flag_modules(cos, 0.35) == ["a", "b", "zero"]
    assert flag_modules(cos, 0.35, "strict") == ["a", "edge", "b"]
    assert flag_modules(cos, 0.0) == []  # 0 < 0 is false
    assert flag_modules(cos, 0.0001) == ["zero"]
    rng = numpy.random.default_rng(1)
    for _ in range(200):
        values = numpy.round(rng.uniform(-1, 1, 8), int(rng.integers(1, 4))) + rng.choice([0, 3e-6, -4e-6], 8)
        cos = {f"m{i}": (float("nan") if rng.random() < 0.2 else float(v)) for i, v in enumerate(values)}
        t = float(rng.choice([numpy.round(rng.uniform(-1, 1), 3), numpy.round(values[0], 5)]))
        expected = [n for n, c in cos.items() if numpy.round(0.0 if math.isnan(c) else c, 5) < t]
        assert flag_modules(cos, t) == expected


@pytest.mark.parametrize("weights", [(0.8, 0.2), (1.0, 1.0), (0.5, -0.3)])
def test_merge_factors_dense(weights):
    g = torch.Generator().manual_seed(0)
    d_out, d_in = 7, 5
    a_f, b_f = torch.randn(3, d_in, generator=g, dtype=F64), torch.randn(d_out, 3, generator=g, dtype=F64)
    a_s, b_s = torch.randn(3, d_in, generator=g, dtype=F64), torch.randn(d_out, 3, generator=g, dtype=F64)
    s_f, s_s = 2.0, 4.0
    w_f, w_s = weights
    a2, b2 = merge_factors((a_f, b_f, s_f), (a_s, b_s, s_s), weights, "updates")
    assert a2.shape == (6, d_in) and b2.shape == (d_out, 6)
    dense = w_f * s_f * b_f @ a_f + w_s * s_s * b_s @ a_s
    torch.testing.assert_close(b2 @ a2, dense, rtol=1e-13, atol=1e-13)
    a3, b3 = merge_factors((a_f, b_f, s_f), (a_s, b_s, s_s), weights, "factors")
    c_f, c_s = math.sqrt(abs(w_f * s_f)), math.sqrt(abs(w_s * s_s))
    sign_s = 1.0 if w_s * s_s >= 0 else -1.0
    expected = (c_f * b_f + c_s * b_s) @ (c_f * a_f + sign_s * c_s * a_s)
    torch.testing.assert_close(b3 @ a3, expected, rtol=1e-13, atol=1e-13)
    if w_s > 0:  # the product is the formula plus cross terms
        cross = c_f * c_s * (b_f @ a_s + b_s @ a_f)
        torch.testing.assert_close(b3 @ a3, dense + cross, rtol=1e-12, atol=1e-12)
    with pytest.raises(SafeMergeError, match=r"needs the same rank|same rank"):
        merge_factors((a_f, b_f, s_f), (a_s[:2], b_s[:, :2], s_s), weights, "factors")


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("safe_key", ["safe", "safe_r2"])
def test_safemerge_updates_match_dense(adapters, direction, tmp_path, capsys, safe_key):
    ft, safe = adapters["ft"], adapters[safe_key]
    cos = _cosines(ft, direction)
    threshold = float(numpy.round(sorted(cos.values())[1], 5)) + 1e-5  # the two lowest modules are below it
    out = tmp_path / "out"
    before = _snapshot(ft) | _snapshot(safe) | _snapshot(direction)
    report = safemerge(ft, safe, direction, str(out), threshold=threshold)
    assert _snapshot(ft) | _snapshot(safe) | _snapshot(direction) == before
    printed = json.loads(capsys.readouterr().out)
    flags = _published_flags(ft, direction, threshold)
    assert sum(flags.values()) == 2 == report["num_merged"] == printed["merged"]
    assert {m: e["merged"] for m, e in report["modules"].items()} == flags
    f, s = _factors(ft), _factors(safe)
    new = _factors(str(out))  # its config has lora_alpha = r: scaling 1
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    r_total = 4 + s[MODULES[0]][0].shape[0]
    assert cfg["r"] == cfg["lora_alpha"] == report["rank"] == r_total and cfg["use_rslora"] is False
    for m in MODULES:
        a_f, b_f, s_f = f[m]
        a_s, b_s, s_s = s[m]
        a2, b2, one = new[m]
        assert one == 1.0 and a2.shape[0] == r_total
        want = 0.8 * s_f * b_f @ a_f + 0.2 * s_s * b_s @ a_s if flags[m] else s_f * b_f @ a_f
        torch.testing.assert_close(b2 @ a2, want, rtol=1e-5, atol=1e-7)
        entry = report["modules"][m]
        assert entry["cosine"] == pytest.approx(cos[m], rel=1e-9)
        assert entry["selection_cosine"] == float(numpy.round(cos[m], 5))
        assert entry["update_norm_after"] == pytest.approx(float(torch.linalg.matrix_norm(want)), rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_NAME]
    )
    assert report["settings"] == {
        "threshold": threshold,
        "finetuned_weight": 0.8,
        "safety_weight": 0.2,
        "selection": "published",
        "combination": "updates",
    }
    assert _leftovers(tmp_path) == []


def test_safemerge_factors_equal_peft_linear_merge(tiny_world, adapters, direction, tmp_path):
    """``combination: factors`` is PEFT's add_weighted_adapter(linear): [0.8, 0.2] where flagged, [1, 0] elsewhere."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft, safe = adapters["ft"], adapters["safe"]
    cos = _cosines(ft, direction)
    threshold = float(numpy.round(sorted(cos.values())[2], 5)) + 1e-5  # three modules merged, one kept
    out = tmp_path / "out"
    report = safemerge(ft, safe, direction, str(out), threshold=threshold, combination="factors")
    flags = _published_flags(ft, direction, threshold)
    assert sum(flags.values()) == 3 and {m: e["merged"] for m, e in report["modules"].items()} == flags

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]), ft, adapter_name="ft"
    )
    model.load_adapter(safe, adapter_name="safe")
    model.add_weighted_adapter(["ft", "safe"], [0.8, 0.2], "merged", combination_type="linear")
    model.add_weighted_adapter(["ft", "safe"], [1.0, 0.0], "kept", combination_type="linear")
    params = dict(model.named_parameters())
    new = load_file(str(out / ADAPTER_WEIGHTS))
    for m in MODULES:
        name = "merged" if flags[m] else "kept"
        for which in "AB":
            peft_t = params[f"{PREFIX}{m}.lora_{which}.{name}.weight"]
            torch.testing.assert_close(
                new[f"{PREFIX}{m}.lora_{which}.weight"], peft_t.detach(), rtol=1e-6, atol=1e-7
            )
    assert (
        model.peft_config["merged"].lora_alpha == json.loads((out / ADAPTER_CONFIG).read_text())["lora_alpha"]
    )


def test_safemerge_output_loads_with_peft(tiny_world, adapters, direction, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    safemerge(adapters["ft"], adapters["safe_r2"], direction, str(out), threshold=1.0)  # every module merged
    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"], dtype=torch.float32)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload().state_dict()
    f, s = _factors(adapters["ft"]), _factors(adapters["safe_r2"])
    for m in MODULES:
        want = (
            weights[f"{m}.weight"].double()
            + 0.8 * f[m][2] * f[m][1] @ f[m][0]
            + 0.2 * s[m][2] * s[m][1] @ s[m][0]
        )
        torch.testing.assert_close(merged[f"{m}.weight"].double(), want, rtol=1e-5, atol=1e-6)


def test_zero_update_is_merged_under_published_only(tiny_world, adapters, direction, tmp_path):
    ft = tmp_path / "ft0"
    shutil.copytree(adapters["ft"], ft)
    state = load_file(str(ft / ADAPTER_WEIGHTS))
    key = f"{PREFIX}{MODULES[0]}.lora_B.weight"
    state[key] = torch.zeros_like(state[key])
    from safetensors.torch import save_file

    save_file(state, str(ft / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    pub = safemerge(str(ft), adapters["safe"], direction, str(tmp_path / "pub"), threshold=0.01)
    strict = safemerge(
        str(ft), adapters["safe"], direction, str(tmp_path / "strict"), threshold=0.01, selection="strict"
    )
    assert pub["modules"][MODULES[0]]["merged"] and pub["modules"][MODULES[0]]["selection_cosine"] == 0.0
    assert not strict["modules"][MODULES[0]]["merged"] and strict["modules"][MODULES[0]]["cosine"] is None
    s = _factors(adapters["safe"])[MODULES[0]]
    a2, b2, _ = _factors(str(tmp_path / "pub"))[MODULES[0]]
    torch.testing.assert_close(b2 @ a2, 0.2 * s[2] * s[1] @ s[0], rtol=1e-5, atol=1e-7)
    json.dumps(pub, allow_nan=False)


# ---------------------------------------------------------------- bad input


def _expect(error, match, out: Path, watch: list[str], *args, **kwargs):
    before = {}
    for w in watch:
        before |= _snapshot(w)
    with pytest.raises(error, match=match):
        safemerge(*args, output=str(out), **kwargs)
    after = {}
    for w in watch:
        after |= _snapshot(w)
    assert after == before, "an input was modified"
    assert not out.exists() and _leftovers(out.parent) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": float("nan")}, r"threshold must be a finite number"),
        ({"threshold": 1.5}, r"threshold must be in \[-1, 1\]"),
        ({"finetuned_weight": float("inf")}, r"finetuned_weight must be a finite number"),
        ({"safety_weight": float("nan")}, r"safety_weight must be a finite number"),
        ({"selection": "rounded"}, r"selection must be 'published'"),
        ({"combination": "ties"}, r"combination must be 'updates' or 'factors'"),
    ],
)
def test_bad_settings(adapters, direction, tmp_path, kwargs, match):
    _expect(
        ArgumentError,
        match,
        tmp_path / "out",
        [adapters["ft"]],
        adapters["ft"],
        adapters["safe"],
        direction,
        **kwargs,
    )


def test_mismatched_inputs(tiny_world, adapters, direction, tmp_path):
    ft, safe = adapters["ft"], adapters["safe"]
    out = tmp_path / "out"
    q_safe = make_adapter(tiny_world["aligned"], tmp_path / "q_safe", seed=9, targets=["q_proj"])
    _expect(
        SafeMergeError,
        r"safety_adapter .*: made for another set of modules: no update for 2 module\(s\)",
        out,
        [ft, q_safe],
        ft,
        q_safe,
        direction,
    )
    _expect(
        SafeMergeError,
        r"module .* has rank 2 but 4 .*combination 'factors' .* needs equal ranks",
        out,
        [ft],
        ft,
        adapters["safe_r2"],
        direction,
        combination="factors",
    )
    q_only = tmp_path / "q.safetensors"
    extract_direction(
        tiny_world["aligned"],
        tiny_world["unaligned"],
        str(q_only),
        target_modules=["q_proj"],
        hash_inputs=False,
    )
    _expect(
        DirectionError,
        rf"{q_only}: made for another set of modules",
        out,
        [ft, safe, str(q_only)],
        ft,
        safe,
        str(q_only),
    )
    _expect(
        SafeMergeError,
        r"safety_adapter\)|adapter directory not found \(safety_adapter\)",
        out,
        [ft],
        ft,
        str(tmp_path / "none"),
        direction,
    )
    ia3 = tmp_path / "ia3"
    shutil.copytree(safe, ia3)
    cfg = json.loads((ia3 / ADAPTER_CONFIG).read_text())
    (ia3 / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    _expect(
        SafeMergeError,
        r"peft_type is 'IA3'; SafeMERGE works on LoRA adapters only",
        out,
        [ft, str(ia3)],
        ft,
        str(ia3),
        direction,
    )


def test_output_clashes_and_overwrite(adapters, direction, tmp_path):
    ft, safe = adapters["ft"], adapters["safe"]
    with pytest.raises(SafeMergeError, match=r"must not be the input safety_adapter directory"):
        safemerge(ft, safe, direction, safe, overwrite=True)
    out = tmp_path / "out"
    safemerge(ft, safe, direction, str(out), threshold=0.0)
    first = _snapshot(out)
    with pytest.raises(OutputExistsError, match=r"exists and is not empty; pass overwrite=True"):
        safemerge(ft, safe, direction, str(out), threshold=1.0)
    assert _snapshot(out) == first
    report = safemerge(ft, safe, direction, str(out), threshold=1.0, overwrite=True)
    assert report["num_merged"] == 4 and _leftovers(tmp_path) == []


def test_failed_write_leaves_no_trace(adapters, direction, tmp_path, monkeypatch):
    import asft_lightning.safemerge as sm

    def broken(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "out"
    monkeypatch.setattr(sm, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        safemerge(adapters["ft"], adapters["safe"], direction, str(out))
    assert not out.exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- the command line


def test_cli(adapters, direction, tmp_path, capsys):
    from asft_lightning.cli import main

    ft, safe = adapters["ft"], adapters["safe"]
    out = tmp_path / "cli"
    main(
        [
            "safemerge",
            f"--adapter={ft}",
            f"--safety_adapter={safe}",
            f"--direction={direction}",
            f"--output={out}",
            "--threshold=1.0",
            "--finetuned_weight=0.6",
            "--safety_weight=0.4",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"output": str(out), "modules": 4, "merged": 4, "rank": 8}
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["settings"]["finetuned_weight"] == 0.6 and report["settings"]["safety_weight"] == 0.4
    f, s, new = _factors(ft), _factors(safe), _factors(str(out))
    for m in MODULES:
        want = 0.6 * f[m][2] * f[m][1] @ f[m][0] + 0.4 * s[m][2] * s[m][1] @ s[m][0]
        torch.testing.assert_close(new[m][1] @ new[m][0], want, rtol=1e-5, atol=1e-7)
