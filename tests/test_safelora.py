"""Safe LoRA post-hoc projection of a PEFT adapter: parity with a dense float64 reference, selection, IO, errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from asft_lightning.direction import (
    DirectionError,
    DirectionSet,
    ModuleDirection,
    extract_direction,
    load_direction,
)
from asft_lightning.safelora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    REPORT_NAME,
    SafeLoRAError,
    lora_modules,
    module_cosine,
    project_adapter,
    safelora,
    select_modules,
)
from asft_lightning.tiny import build_tiny_world, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

F64 = torch.float64
PREFIX = "base_model.model."
MODULES = sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The tiny aligned / unaligned Llama pair (short training: speed). Never modified by any test."""
    return build_tiny_world(tmp_path_factory.mktemp("world"), train_steps=20)


@pytest.fixture(scope="module")
def direction(world, tmp_path_factory) -> str:
    """Published-form direction (V stored in float64 so the dense reference sees the very same numbers)."""
    path = tmp_path_factory.mktemp("dir") / "v.safetensors"
    extract_direction(world["aligned"], world["unaligned"], str(path), dtype="float64")
    return str(path)


@pytest.fixture(scope="module")
def subspace_direction(world, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dir") / "s.safetensors"
    extract_direction(
        world["aligned"], world["unaligned"], str(path), projector="subspace", rank=4, dtype="float64"
    )
    return str(path)


def _make_adapter(model_path: str | None, out: Path, seed: int, config=None) -> str:
    """A PEFT LoRA adapter (r=4, alpha=8, q_proj/v_proj) with random non-zero lora_B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path) if config is None else LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory) -> str:
    return _make_adapter(world["aligned"], tmp_path_factory.mktemp("adapter") / "lora", seed=1)


@pytest.fixture(scope="module")
def reference(adapter, direction) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, in float64 with dense matrices: A, B, C = V V^T / ||V||_F, cos(C B A, B A), C @ B."""
    state = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    ds = load_direction(direction)
    out = {}
    for m in MODULES:
        a = state[f"{PREFIX}{m}.lora_A.weight"].double()
        b = state[f"{PREFIX}{m}.lora_B.weight"].double()
        v = ds.modules[m].direction.double()
        c = v @ v.mT / torch.linalg.matrix_norm(v)
        ba = b @ a
        cba = c @ ba
        cos = (cba * ba).sum() / (torch.linalg.matrix_norm(cba) * torch.linalg.matrix_norm(ba))
        out[m] = {"A": a, "B": b, "C": c, "cos": cos, "CB": c @ b}
    return out


def _lowest(reference, k: int) -> set[str]:
    return set(sorted(reference, key=lambda m: float(reference[m]["cos"]))[:k])


def _snapshot(root: str | Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def _copy_adapter(adapter: str, dest: Path) -> Path:
    shutil.copytree(adapter, dest)
    return dest


def _leftovers(parent: Path) -> list[str]:
    """Temporary directories a failed or finished run might have left next to its output."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- end to end against the dense reference


def test_adapter_fixture_is_peft_lora(adapter):
    with safe_open(str(Path(adapter) / ADAPTER_WEIGHTS), framework="pt") as fh:
        keys = sorted(fh.keys())
    assert keys == sorted(f"{PREFIX}{m}.lora_{w}.weight" for m in MODULES for w in "AB")
    assert json.loads((Path(adapter) / ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"


def test_cosines_and_projection_match_dense(adapter, direction, reference, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(adapter)
    report = safelora(adapter, direction, str(out), num_proj_layers=2)
    assert _snapshot(adapter) == before  # the input adapter is never touched

    projected = {m for m, r in report["modules"].items() if r["projected"]}
    assert projected == _lowest(reference, 2)
    assert report["num_projected"] == 2 and report["num_modules"] == 4
    assert report["settings"] == {
        "mode": "num_proj_layers",
        "num_proj_layers": 2,
        "threshold": None,
        "selection": "published",
    }

    new = load_file(str(out / ADAPTER_WEIGHTS))
    old = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    assert sorted(new) == sorted(old)
    for m, ref in reference.items():
        entry = report["modules"][m]
        assert entry["cosine"] == pytest.approx(float(ref["cos"]), rel=1e-10, abs=0)
        assert 0.0 < entry["cosine"] < 1.0
        assert entry["shape"] == list(ref["C"].shape[:1]) + [ref["A"].shape[1]]
        assert entry["rank"] == 4
        a_key, b_key = f"{PREFIX}{m}.lora_A.weight", f"{PREFIX}{m}.lora_B.weight"
        assert torch.equal(new[a_key], old[a_key])  # A is never changed
        assert new[b_key].dtype == old[b_key].dtype == torch.float32
        if m in projected:
            torch.testing.assert_close(new[b_key], ref["CB"].float(), rtol=1e-6, atol=1e-7)
            after = torch.linalg.matrix_norm(ref["CB"] @ ref["A"])
            assert entry["update_norm_after"] == pytest.approx(float(after), rel=1e-10)
        else:
            assert torch.equal(new[b_key], old[b_key])
        assert entry["update_norm"] == pytest.approx(
            float(torch.linalg.matrix_norm(ref["B"] @ ref["A"])), rel=1e-10
        )


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_exactly_num_proj_layers_lowest_are_projected(adapter, direction, reference, tmp_path, k):
    report = safelora(adapter, direction, str(tmp_path / "out"), num_proj_layers=k)
    projected = {m for m, r in report["modules"].items() if r["projected"]}
    assert projected == _lowest(reference, k)
    assert len(projected) == report["num_projected"] == min(k, 4)


def test_threshold_mode(adapter, direction, reference, tmp_path):
    cos = sorted(float(r["cos"]) for r in reference.values())
    cases = [((cos[1] + cos[2]) / 2, 2), (cos[0], 0), (cos[0] + 1e-9, 1), (-1.0, 0), (1.0, 4)]
    for i, (threshold, n) in enumerate(cases):
        report = safelora(
            adapter,
            direction,
            str(tmp_path / f"out{i}"),
            num_proj_layers=None,
            threshold=threshold,
            selection="strict",
        )
        projected = {m for m, r in report["modules"].items() if r["projected"]}
        assert projected == {m for m, r in reference.items() if float(r["cos"]) < threshold}
        assert len(projected) == n, threshold
        assert report["settings"] == {
            "mode": "threshold",
            "num_proj_layers": None,
            "threshold": threshold,
            "selection": "strict",
        }
    # The default num_proj_layers may come along with a threshold (the CLI passes its default through).
    report = safelora(adapter, direction, str(tmp_path / "outd"), threshold=(cos[1] + cos[2]) / 2)
    assert report["settings"]["mode"] == "threshold" and report["num_projected"] == 2


def test_output_loads_with_peft(world, adapter, direction, reference, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = safelora(adapter, direction, str(out), num_proj_layers=3)
    projected = {m for m, r in report["modules"].items() if r["projected"]}
    base = AutoModelForCausalLM.from_pretrained(world["aligned"], dtype=torch.float32)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(out))
    params = dict(model.named_parameters())
    for m, ref in reference.items():
        expected_b = ref["CB"] if m in projected else ref["B"]
        a = params[f"{PREFIX}{m}.lora_A.default.weight"]
        b = params[f"{PREFIX}{m}.lora_B.default.weight"]
        torch.testing.assert_close(a.double(), ref["A"], rtol=0, atol=0)
        torch.testing.assert_close(b.double(), expected_b, rtol=1e-6, atol=1e-7)
    # The merged weights are W + (alpha / r) B' A.
    merged = model.merge_and_unload().state_dict()
    for m, ref in reference.items():
        expected_b = ref["CB"] if m in projected else ref["B"]
        w = weights[f"{m}.weight"].double() + 2.0 * expected_b @ ref["A"]
        torch.testing.assert_close(merged[f"{m}.weight"].double(), w, rtol=1e-5, atol=1e-5)


def test_output_directory_contents(adapter, direction, tmp_path):
    out = tmp_path / "out"
    report = safelora(adapter, direction, str(out), num_proj_layers=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_NAME])
    for name in ("README.md", ADAPTER_CONFIG):
        assert (out / name).read_bytes() == (Path(adapter) / name).read_bytes()
    on_disk = json.loads((out / REPORT_NAME).read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["direction"] == str(Path(direction).resolve())
    assert on_disk["adapter"] == str(Path(adapter).resolve())
    assert on_disk["direction_sha256"] == hashlib.sha256(Path(direction).read_bytes()).hexdigest()
    assert on_disk["projector"]["kind"] == "safelora"
    assert set(on_disk["modules"]) == set(MODULES)
    for entry in on_disk["modules"].values():
        assert isinstance(entry["cosine"], float) and isinstance(entry["projected"], bool)
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "pt" and json.loads(meta["asft_safelora"])["num_projected"] == 2
    assert _leftovers(tmp_path) == []


def test_overwrite(adapter, direction, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is fine
    safelora(adapter, direction, str(out), num_proj_layers=1)
    first = _snapshot(out)
    with pytest.raises(SafeLoRAError, match=rf"{out}: exists and is not empty; pass overwrite=True"):
        safelora(adapter, direction, str(out), num_proj_layers=3)
    assert _snapshot(out) == first
    report = safelora(adapter, direction, str(out), num_proj_layers=3, overwrite=True)
    assert report["num_projected"] == 3
    assert json.loads((out / REPORT_NAME).read_text())["num_projected"] == 3
    assert _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafeLoRAError, match=r"exists and is not a directory"):
        safelora(adapter, direction, str(tmp_path / "file"), overwrite=True)


def test_adapter_name_in_keys(adapter, direction, reference, tmp_path):
    """Some PEFT versions keep the adapter name: ``...lora_A.default.weight``."""
    named = _copy_adapter(adapter, tmp_path / "named")
    state = load_file(str(named / ADAPTER_WEIGHTS))
    state = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
    save_file(state, str(named / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    report = safelora(str(named), direction, str(tmp_path / "out"), num_proj_layers=2)
    assert {m for m, r in report["modules"].items() if r["projected"]} == _lowest(reference, 2)
    for m, ref in reference.items():
        assert report["modules"][m]["cosine"] == pytest.approx(float(ref["cos"]), rel=1e-10)
        assert report["modules"][m]["lora_B"] == f"{PREFIX}{m}.lora_B.default.weight"
    assert sorted(load_file(str(tmp_path / "out" / ADAPTER_WEIGHTS))) == sorted(state)


def test_lowrank_direction_through_safelora(adapter, subspace_direction, tmp_path):
    ds = load_direction(subspace_direction)
    state = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    report = safelora(adapter, subspace_direction, str(tmp_path / "out"), num_proj_layers=4)
    new = load_file(str(tmp_path / "out" / ADAPTER_WEIGHTS))
    assert report["projector"]["kind"] == "subspace"
    for m in MODULES:
        u = ds.modules[m].basis
        a, b = state[f"{PREFIX}{m}.lora_A.weight"].double(), state[f"{PREFIX}{m}.lora_B.weight"].double()
        c = u @ u.mT
        ba = b @ a
        cos = (c @ ba * ba).sum() / (torch.linalg.matrix_norm(c @ ba) * torch.linalg.matrix_norm(ba))
        assert report["modules"][m]["cosine"] == pytest.approx(float(cos), rel=1e-10)
        torch.testing.assert_close(new[f"{PREFIX}{m}.lora_B.weight"], (c @ b).float(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the pure functions


def _state64(adapter: str) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(Path(adapter) / ADAPTER_WEIGHTS)).items()}


@pytest.mark.parametrize("which", ["full", "subspace"])
def test_project_adapter_float64_parity(adapter, direction, subspace_direction, which):
    ds = load_direction(direction if which == "full" else subspace_direction)
    state = _state64(adapter)
    keep = {k: v.clone() for k, v in state.items()}
    new, report = project_adapter(state, ds, num_proj_layers=4)
    assert all(torch.equal(state[k], keep[k]) for k in state)  # the input dict is not modified
    for m in MODULES:
        md = ds.modules[m]
        c = (
            md.direction @ md.direction.mT / torch.linalg.matrix_norm(md.direction)
            if which == "full"
            else (md.basis @ md.basis.mT)
        )
        b_key = f"{PREFIX}{m}.lora_B.weight"
        assert new[b_key].dtype == F64
        torch.testing.assert_close(new[b_key], c @ state[b_key], rtol=1e-10, atol=1e-14)
        assert report["modules"][m]["projected"]


def test_module_cosine_properties():
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r = 12, 7, 3
    v = torch.randn(d_out, d_in, generator=g, dtype=F64)
    u = torch.linalg.svd(v, full_matrices=False).U[:, :2]
    forms = [
        ModuleDirection("m", (d_out, d_in), torch.linalg.vector_norm(v), direction=v),
        ModuleDirection("m", (d_out, d_in), torch.linalg.vector_norm(v), basis=u),
        ModuleDirection(
            "m",
            (d_out, d_in),
            torch.linalg.vector_norm(v),
            basis=u,
            weights=torch.tensor([3.0, 0.5], dtype=F64),
        ),
    ]
    a = torch.randn(r, d_in, generator=g, dtype=F64)
    b = torch.randn(d_out, r, generator=g, dtype=F64)
    for md in forms:
        cb = md.apply(torch.eye(d_out, dtype=F64))  # dense C, for the reference only
        ba = b @ a
        ref = (cb @ ba * ba).sum() / (torch.linalg.matrix_norm(cb @ ba) * torch.linalg.matrix_norm(ba))
        cos = module_cosine(a, b, md)
        assert cos.dtype == F64 and cos.shape == ()
        torch.testing.assert_close(cos, ref, rtol=1e-12, atol=0)
        # Invariant to the scale of A and B (and so to the LoRA scaling alpha / r).
        torch.testing.assert_close(module_cosine(3 * a, 0.1 * b, md), cos, rtol=1e-12, atol=0)
        # No update: undefined (nan); an update orthogonal to C's range: 0; inside it (subspace): 1.
        assert math.isnan(float(module_cosine(a, torch.zeros_like(b), md)))
    q = torch.linalg.qr(v, mode="complete").Q[:, d_in:]  # orthogonal to V's columns
    b_off = q[:, :r]
    for md in forms:
        assert abs(float(module_cosine(a, b_off, md))) < 1e-12
    assert float(module_cosine(a, u @ torch.randn(2, r, generator=g, dtype=F64), forms[1])) == pytest.approx(
        1.0
    )
    assert module_cosine(a.float(), b.float(), forms[0].to("cpu", torch.float32)).dtype == torch.float32


def test_select_modules_strict():
    cos = {"a": 0.5, "b": 0.1, "c": float("nan"), "d": 0.3, "e": 0.1}

    def sel(**kw):
        return select_modules(cos, selection="strict", **kw)

    assert sel(num_proj_layers=1) == ["b"]  # ties: first in order, exactly k
    assert sel(num_proj_layers=2) == ["b", "e"]
    assert sel(num_proj_layers=3) == ["b", "d", "e"]  # returned in the order of `cos`
    assert sel(num_proj_layers=10) == ["a", "b", "d", "e"]  # nan (zero update) is never chosen
    assert sel(threshold=0.3) == ["b", "e"]  # strictly below
    assert sel(threshold=0.31) == ["b", "d", "e"]
    assert sel() == ["a", "b", "d", "e"]  # default: 10


def test_zero_update_module_is_reported_not_projected(adapter, direction):
    """``strict``: a module without an update has no cosine and is never selected."""
    state = _state64(adapter)
    zero_key = f"{PREFIX}{MODULES[0]}.lora_B.weight"
    state[zero_key] = torch.zeros_like(state[zero_key])
    new, report = project_adapter(state, load_direction(direction), num_proj_layers=4, selection="strict")
    entry = report["modules"][MODULES[0]]
    assert entry["cosine"] is None and entry["projected"] is False and entry["update_norm"] == 0.0
    assert report["num_zero_updates"] == 1 and report["num_projected"] == 3
    assert torch.equal(new[zero_key], state[zero_key])
    json.dumps(report, allow_nan=False)  # the report stays strict JSON


def test_lora_modules_parsing():
    t = torch.zeros(1)
    state = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": t,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": t,
        "base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight": t,
        "base_model.model.model.layers.10.self_attn.q_proj.lora_B.weight": t,
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": t,
        "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight": t,
        "base_model.model.lm_head.weight": t,  # modules_to_save: passed through, not a LoRA module
    }
    pairs = lora_modules(state)
    assert list(pairs) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 2, 10)]
    assert pairs["model.layers.2.self_attn.q_proj"][1].endswith("layers.2.self_attn.q_proj.lora_B.weight")


# ---------------------------------------------------------------- bad inputs


def _edit_adapter(adapter: str, dest: Path, edit_state=None, edit_config=None) -> str:
    path = _copy_adapter(adapter, dest)
    if edit_state is not None:
        state = load_file(str(path / ADAPTER_WEIGHTS))
        edit_state(state)
        save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        edit_config(cfg)
        (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return str(path)


def _expect(error, match, adapter, direction, out: Path, **kwargs):
    with pytest.raises(error, match=match):
        safelora(adapter, direction, str(out), **kwargs)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_missing_adapter_pieces(adapter, direction, tmp_path):
    out = tmp_path / "out"
    _expect(
        SafeLoRAError,
        rf"{tmp_path / 'nope'}: adapter directory not found",
        str(tmp_path / "nope"),
        direction,
        out,
    )
    no_cfg = _copy_adapter(adapter, tmp_path / "no_cfg")
    (no_cfg / ADAPTER_CONFIG).unlink()
    _expect(SafeLoRAError, rf"{no_cfg / ADAPTER_CONFIG}: missing", str(no_cfg), direction, out)
    no_w = _copy_adapter(adapter, tmp_path / "no_w")
    (no_w / ADAPTER_WEIGHTS).unlink()
    _expect(SafeLoRAError, rf"{no_w / ADAPTER_WEIGHTS}: missing$", str(no_w), direction, out)
    (no_w / "adapter_model.bin").write_bytes(b"\0")
    _expect(
        SafeLoRAError,
        r"found adapter_model.bin: re-save it with safe_serialization=True",
        str(no_w),
        direction,
        out,
    )
    _expect(SafeLoRAError, r"not a directory", str(Path(adapter) / ADAPTER_CONFIG), direction, out)


def test_corrupt_adapter_files(adapter, direction, tmp_path):
    out = tmp_path / "out"
    bad = _copy_adapter(adapter, tmp_path / "bad")
    (bad / ADAPTER_WEIGHTS).write_bytes((bad / ADAPTER_WEIGHTS).read_bytes()[:-50])
    _expect(
        SafeLoRAError,
        rf"{bad / ADAPTER_WEIGHTS}: corrupt or unreadable safetensors",
        str(bad),
        direction,
        out,
    )
    bad_cfg = _copy_adapter(adapter, tmp_path / "bad_cfg")
    (bad_cfg / ADAPTER_CONFIG).write_text("{nope")
    _expect(SafeLoRAError, rf"{bad_cfg / ADAPTER_CONFIG}: not valid JSON", str(bad_cfg), direction, out)


def test_not_a_lora_adapter(adapter, direction, tmp_path):
    out = tmp_path / "out"
    ia3 = _edit_adapter(adapter, tmp_path / "ia3", edit_config=lambda c: c.update(peft_type="IA3"))
    _expect(SafeLoRAError, r"peft_type is 'IA3'; Safe LoRA works on LoRA adapters only", ia3, direction, out)
    dora = _edit_adapter(adapter, tmp_path / "dora", edit_config=lambda c: c.update(use_dora=True))
    _expect(SafeLoRAError, r"DoRA adapter", dora, direction, out)

    def drop_lora(state):
        for k in list(state):
            state[k.replace("lora_", "ia3_")] = state.pop(k)

    no_lora = _edit_adapter(adapter, tmp_path / "no_lora", edit_state=drop_lora)
    _expect(SafeLoRAError, r"no LoRA tensors .*is this a LoRA adapter", no_lora, direction, out)


def test_inconsistent_lora_tensors(adapter, direction, tmp_path):
    out = tmp_path / "out"
    b_key = f"{PREFIX}{MODULES[1]}.lora_B.weight"
    a_key = f"{PREFIX}{MODULES[1]}.lora_A.weight"
    lonely = _edit_adapter(adapter, tmp_path / "lonely", edit_state=lambda s: s.pop(b_key))
    _expect(SafeLoRAError, rf"module {MODULES[1]} has '{a_key}' but no lora_B tensor", lonely, direction, out)

    def bad_rank(state):
        state[b_key] = state[b_key][:, :3].contiguous()

    rank = _edit_adapter(adapter, tmp_path / "rank", edit_state=bad_rank)
    _expect(
        SafeLoRAError, rf"module {MODULES[1]}: rank mismatch, '{a_key}' is \(4, 32\)", rank, direction, out
    )

    def nan(state):
        state[b_key][0, 0] = float("nan")

    nonfinite = _edit_adapter(adapter, tmp_path / "nan", edit_state=nan)
    _expect(SafeLoRAError, rf"tensor '{b_key}' has non-finite values", nonfinite, direction, out)

    def two_adapters(state):
        state[a_key.replace(".weight", ".other.weight")] = state[a_key].clone()

    two = _edit_adapter(adapter, tmp_path / "two", edit_state=two_adapters)
    _expect(SafeLoRAError, r"(several adapters|two lora_A tensors)", two, direction, out)


def test_direction_for_other_modules(world, adapter, tmp_path):
    q_only = tmp_path / "q.safetensors"
    extract_direction(world["aligned"], world["unaligned"], str(q_only), target_modules=["q_proj"])
    _expect(
        DirectionError,
        rf"{q_only}: made for another set of modules: no direction for 2 targeted module\(s\) of .*v_proj",
        adapter,
        str(q_only),
        tmp_path / "out",
    )


def test_direction_for_other_shapes(direction, tmp_path):
    vocab = 70
    wide = _make_adapter(None, tmp_path / "wide", seed=2, config=tiny_llama_config(vocab, hidden=48))
    _expect(
        DirectionError,
        r"module model.layers.0.self_attn.q_proj has shape \(32, 32\) in the direction file but \(48, 48\) in "
        r".*adapter_model.safetensors",
        wide,
        direction,
        tmp_path / "out",
    )


def test_missing_or_corrupt_direction(adapter, direction, tmp_path):
    _expect(
        DirectionError,
        r"direction file not found",
        adapter,
        str(tmp_path / "none.safetensors"),
        tmp_path / "out",
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(Path(direction).read_bytes()[:100])
    _expect(DirectionError, rf"{bad}: corrupt or unreadable", adapter, str(bad), tmp_path / "out")


def test_zero_direction_is_refused(adapter, direction, tmp_path):
    ds: DirectionSet = load_direction(direction)
    tensors = load_file(direction)
    name = MODULES[2]
    tensors[f"{name}.direction"] = torch.zeros_like(tensors[f"{name}.direction"])
    tensors[f"{name}.norm"] = torch.zeros_like(tensors[f"{name}.norm"])
    zero = tmp_path / "zero.safetensors"
    save_file(tensors, str(zero), metadata={"asft": json.dumps(ds.metadata)})
    _expect(
        SafeLoRAError, rf"{zero}: module {name} has \|\|V\|\|_F = 0.0", adapter, str(zero), tmp_path / "out"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_proj_layers": 0}, r"num_proj_layers must be >= 1, got 0"),
        ({"num_proj_layers": -3}, r"num_proj_layers must be >= 1, got -3"),
        ({"num_proj_layers": 2.5}, r"num_proj_layers must be an integer"),
        ({"num_proj_layers": None, "threshold": 1.5}, r"threshold must be in \[-1, 1\].*got 1.5"),
        ({"num_proj_layers": None, "threshold": -1.01}, r"threshold must be in \[-1, 1\]"),
        ({"num_proj_layers": None, "threshold": float("nan")}, r"threshold must be in \[-1, 1\]"),
        ({"threshold": 2.0}, r"threshold must be in \[-1, 1\]"),
        (
            {"num_proj_layers": 3, "threshold": 0.5},
            r"give num_proj_layers \(3\) or threshold \(0.5\), not both",
        ),
    ],
)
def test_bad_settings(adapter, direction, tmp_path, kwargs, message):
    _expect(SafeLoRAError, message, adapter, direction, tmp_path / "out", **kwargs)
    with pytest.raises(SafeLoRAError, match=message):
        select_modules({"a": 0.1}, **kwargs)


def test_output_must_not_be_or_contain_the_input(adapter, direction, tmp_path):
    copy = _copy_adapter(adapter, tmp_path / "in")
    before = _snapshot(copy)
    for out in (copy, copy / "sub", tmp_path):
        with pytest.raises(SafeLoRAError, match=r"must not be the input adapter directory"):
            safelora(str(copy), direction, str(out), overwrite=True)
    assert _snapshot(copy) == before
    assert not (copy / "sub").exists()


def test_failed_write_leaves_no_trace(adapter, direction, tmp_path, monkeypatch):
    """The output appears complete or not at all; an existing output survives a failed overwrite."""
    import asft_lightning.safelora as sl

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "out"
    monkeypatch.setattr(sl, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        safelora(adapter, direction, str(out))
    assert not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.undo()
    safelora(adapter, direction, str(out), num_proj_layers=1)
    first = _snapshot(out)
    monkeypatch.setattr(sl, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        safelora(adapter, direction, str(out), num_proj_layers=2, overwrite=True)
    assert _snapshot(out) == first and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- published selection (the authors' rule)


def _published_rule(cosines: list[float], num_proj_layers: int | None = None, threshold: float | None = None):
    """Which modules the published Safe LoRA code projects, re-implemented from its description.

    ``cosines`` are what its ``cosine_similarity(...).item()`` returns (0 for a zero update); each is rounded with
    ``numpy.round(c, 5)``; in number mode the threshold is ``numpy.sort(cos)[:k][-1]``; a module is projected when
    ``cos <= threshold``.
    """
    rounded = [numpy.round(c, 5) for c in cosines]
    if threshold is None:
        threshold = numpy.sort(rounded)[:num_proj_layers][-1]
    return [bool(c <= threshold) for c in rounded]


def _published_cosine(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
    """The published code's cosine: dense ``(C B) A`` against ``B A``, flattened, torch's ``cosine_similarity``."""
    fw = (c @ b) @ a
    ori = b @ a
    return torch.nn.functional.cosine_similarity(fw.reshape(1, -1), ori.reshape(1, -1)).item()


def _chosen(cos: dict[str, float], flags: list[bool]) -> list[str]:
    return [name for name, flag in zip(cos, flags, strict=True) if flag]


def _as_published_input(cos: dict[str, float]) -> list[float]:
    return [0.0 if math.isnan(v) else v for v in cos.values()]  # cosine_similarity of a zero vector is 0


def test_published_selection_ties_at_kth_value():
    cos = {"a": 0.2, "b": 0.7, "c": 0.2, "d": 0.200000001, "e": 0.4}
    for k in (1, 2, 3, 4, 5, 9):
        chosen = select_modules(cos, num_proj_layers=k)
        expected = _chosen(cos, _published_rule(list(cos.values()), num_proj_layers=k))
        assert chosen == expected, k
    assert select_modules(cos, num_proj_layers=1) == ["a", "c", "d"]  # all three round to 0.2: all projected
    assert select_modules(cos, num_proj_layers=1, selection="strict") == ["a"]  # strict: exactly one
    assert select_modules(cos, num_proj_layers=4) == ["a", "c", "d", "e"]


def test_published_selection_threshold_boundary():
    # 0.500004 rounds to 0.5: at a threshold of 0.5 the published rule projects it (<=), strict does not (<).
    cos = {"on": 0.500004, "exact": 0.5, "above": 0.500006, "below": 0.499996}
    assert select_modules(cos, threshold=0.5) == ["on", "exact", "below"]
    assert select_modules(cos, threshold=0.5, selection="strict") == ["below"]
    expected = _chosen(cos, _published_rule(list(cos.values()), threshold=0.5))
    assert select_modules(cos, threshold=0.5) == expected


def test_published_selection_zero_update():
    """A zero update has cosine 0 under the published rule: it can take a slot and be 'projected'."""
    cos = {"a": 0.1, "zero": float("nan"), "b": 0.3}
    assert select_modules(cos, num_proj_layers=1) == ["zero"]
    assert select_modules(cos, num_proj_layers=1, selection="strict") == ["a"]
    assert select_modules(cos, threshold=0.0) == ["zero"]
    assert select_modules(cos, threshold=0.0, selection="strict") == []
    for k in (1, 2, 3):
        expected = _chosen(cos, _published_rule(_as_published_input(cos), num_proj_layers=k))
        assert select_modules(cos, num_proj_layers=k) == expected


def test_published_selection_matches_reimplementation_at_random():
    """Many draws with ties, near-ties at the 5th decimal, zero updates and negative cosines."""
    rng = numpy.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        values = numpy.round(rng.uniform(-1, 1, n), int(rng.integers(1, 4))) + rng.choice(
            [0, 1e-7, -3e-6, 4e-6], n
        )
        values = numpy.clip(values, -1, 1)
        cos = {f"m{i}": (float("nan") if rng.random() < 0.15 else float(v)) for i, v in enumerate(values)}
        published_input = _as_published_input(cos)
        k = int(rng.integers(1, n + 3))
        expected = _chosen(cos, _published_rule(published_input, num_proj_layers=k))
        assert select_modules(cos, num_proj_layers=k) == expected
        t = float(rng.choice([numpy.round(rng.uniform(-1, 1), 5), published_input[int(rng.integers(0, n))]]))
        expected = _chosen(cos, _published_rule(published_input, threshold=t))
        assert select_modules(cos, num_proj_layers=None, threshold=t) == expected


def _synthetic_case() -> tuple[dict[str, torch.Tensor], DirectionSet, dict[str, torch.Tensor]]:
    """Adapter tensors and directions with a tie, a zero update and a cosine at 0.500004; dense C per module."""
    g = torch.Generator().manual_seed(7)
    d_out, d_in, r = 6, 5, 2
    v = torch.randn(d_out, d_in, generator=g, dtype=F64)
    a0, b0 = torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64)
    a3, b3 = torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64)
    c_val = 0.500004
    e1 = torch.tensor([[1.0], [0.0]], dtype=F64)
    factors = {
        "layers.0.q": (a0, b0, v),
        "layers.1.q": (a0.clone(), b0.clone(), v.clone()),  # the same cosine as layers.0.q: a tie
        "layers.2.q": (a3, torch.zeros(d_out, r, dtype=F64), v),  # no update
        "layers.3.q": (a3, b3, v),
        "layers.4.q": (
            torch.ones(1, 1, dtype=F64),
            torch.tensor([[c_val], [math.sqrt(1 - c_val**2)]], dtype=F64),
            None,
        ),
    }
    state, modules, dense = {}, {}, {}
    for name, (a, b, vv) in factors.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = a
        state[f"{PREFIX}{name}.lora_B.weight"] = b
        shape = (b.shape[0], a.shape[1])
        if vv is None:  # an orthogonal projector on e1: cos(C B A, B A) = c_val
            modules[name] = ModuleDirection(name, shape, torch.tensor(1.0, dtype=F64), basis=e1)
            dense[name] = e1 @ e1.mT
        else:
            modules[name] = ModuleDirection(name, shape, torch.linalg.matrix_norm(vv), direction=vv)
            dense[name] = vv @ vv.mT / torch.linalg.matrix_norm(vv)
    return state, DirectionSet("synthetic.safetensors", {"projector": {"kind": "mixed"}}, modules), dense


@pytest.mark.parametrize(
    "kwargs",
    [{"num_proj_layers": k} for k in (1, 2, 3, 4, 5)]
    + [{"num_proj_layers": None, "threshold": t} for t in (0.5, 0.0, -0.2)],
)
def test_project_adapter_published_matches_reimplementation(kwargs):
    state, directions, dense = _synthetic_case()
    names = list(directions.modules)
    published = []
    for name in names:
        a, b = state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"]
        published.append(_published_cosine(a, b, dense[name]))
    assert published[0] == published[1] and published[2] == 0.0
    assert numpy.round(published[4], 5) == 0.5 and published[4] > 0.5
    expected = _published_rule(published, kwargs.get("num_proj_layers"), kwargs.get("threshold"))
    new, report = project_adapter(state, directions, **kwargs)
    assert [report["modules"][n]["projected"] for n in names] == expected
    assert report["settings"]["selection"] == "published"
    for name, projected in zip(names, expected, strict=True):
        entry = report["modules"][name]
        assert entry["selection_cosine"] == pytest.approx(
            float(numpy.round(published[names.index(name)], 5)), abs=0
        )
        b_key = f"{PREFIX}{name}.lora_B.weight"
        want = dense[name] @ state[b_key] if projected else state[b_key]
        torch.testing.assert_close(new[b_key], want, rtol=1e-12, atol=1e-15)
    if "threshold" not in kwargs:
        assert report["selection_threshold"] == float(
            numpy.sort(numpy.round(published, 5))[: kwargs["num_proj_layers"]][-1]
        )
    json.dumps(report, allow_nan=False)


def test_project_adapter_published_vs_strict_differ_where_documented():
    state, directions, _ = _synthetic_case()
    _, pub = project_adapter(state, directions, num_proj_layers=None, threshold=0.5)
    _, strict = project_adapter(state, directions, num_proj_layers=None, threshold=0.5, selection="strict")
    # the boundary module (0.500004 -> 0.5) and the zero update are projected only under the published rule
    diff = {n for n in pub["modules"] if pub["modules"][n]["projected"] != strict["modules"][n]["projected"]}
    assert diff == {"layers.4.q", "layers.2.q"}
    assert (
        strict["modules"]["layers.2.q"]["cosine"] is None
        and pub["modules"]["layers.2.q"]["selection_cosine"] == 0.0
    )


def test_bad_selection(adapter, direction, tmp_path):
    _expect(
        SafeLoRAError,
        r"selection must be 'published' .* or 'strict'",
        adapter,
        direction,
        tmp_path / "out",
        selection="rounded",
    )


def test_safelora_cli_selection(adapter, direction, tmp_path, capsys):
    from asft_lightning.cli import main

    for selection in ("published", "strict"):
        out = tmp_path / selection
        main(
            [
                "safelora",
                f"--adapter={adapter}",
                f"--direction={direction}",
                f"--output={out}",
                "--num_proj_layers=2",
                f"--selection={selection}",
            ]
        )
        printed = json.loads(capsys.readouterr().out)
        assert printed["projected"] == 2
        report = json.loads((out / REPORT_NAME).read_text())
        assert report["settings"]["selection"] == selection
