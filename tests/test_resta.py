"""RESTA (``asft resta``): dense float64 formulas, adapter and model outputs on the tiny world, bad input, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from asft_lightning.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from asft_lightning.checkpoints import CheckpointError
from asft_lightning.direction import DirectionError, extract_direction, load_direction
from asft_lightning.errors import ArgumentError, OutputExistsError
from asft_lightning.resta import (
    REPORT_NAME,
    RestaError,
    direction_factors,
    pad_rank,
    resta,
    resta_factors,
    resta_update,
    select_direction_modules,
)
from asft_lightning.tiny import tiny_llama_config

F64 = torch.float64
PREFIX = "base_model.model."
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
R, ALPHA = 4, 8


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def direction(tiny_world, tmp_path_factory) -> str:
    """V = aligned - unaligned for q_proj / v_proj, stored in float64 so the references see the same numbers."""
    path = tmp_path_factory.mktemp("dir") / "v.safetensors"
    extract_direction(
        tiny_world["aligned"], tiny_world["unaligned"], str(path), dtype="float64", hash_inputs=False
    )
    return str(path)


def make_adapter(
    model_path: str, out: Path, seed: int, r: int = R, alpha: float = ALPHA, targets=None, **extra
) -> str:
    """A PEFT LoRA adapter with random non-zero A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ["q_proj", "v_proj"], **extra)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def adapter(tiny_world, tmp_path_factory) -> str:
    return make_adapter(tiny_world["aligned"], tmp_path_factory.mktemp("adapter") / "lora", seed=1)


def _snapshot(root: str | Path) -> dict[str, tuple[str, int]]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _lora(adapter: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    state = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    return state[f"{PREFIX}{module}.lora_A.weight"].double(), state[
        f"{PREFIX}{module}.lora_B.weight"
    ].double()


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


# ---------------------------------------------------------------- pure math, float64


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_direction_factors_exact_and_truncated(shape):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(*shape, generator=g, dtype=F64)
    b, a, dropped = direction_factors(v)
    assert dropped == 0.0 and b.shape[1] == a.shape[0] == min(shape)
    torch.testing.assert_close(b @ a, v, rtol=0, atol=0)  # an identity factor: exact to the bit
    for k in (1, 3, min(shape) - 1):
        b, a, dropped = direction_factors(v, k)
        u, s, vh = torch.linalg.svd(v, full_matrices=False)
        dense_k = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        torch.testing.assert_close(b @ a, dense_k, rtol=1e-12, atol=1e-12)
        assert dropped == pytest.approx(float(torch.linalg.matrix_norm(v - dense_k)), rel=1e-10)
    b, a, dropped = direction_factors(v, 50)  # a rank at or above min(d_out, d_in) is exact
    assert dropped == 0.0
    torch.testing.assert_close(b @ a, v, rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.5, -2.0, 0.0])
def test_resta_factors_carry_the_dense_sum(gamma):
    g = torch.Generator().manual_seed(1)
    d_out, d_in, r, s = 8, 5, 3, 2.5
    a, b = torch.randn(r, d_in, generator=g, dtype=F64), torch.randn(d_out, r, generator=g, dtype=F64)
    v = torch.randn(d_out, d_in, generator=g, dtype=F64)
    dense = s * b @ a + gamma * v
    torch.testing.assert_close(resta_update(v, gamma, a, b, s), dense, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(resta_update(v, gamma), gamma * v, rtol=0, atol=0)
    a2, b2, dropped = resta_factors(a, b, s, v, gamma)
    assert a2.shape == (r + d_in, d_in) and b2.shape == (d_out, r + d_in) and dropped == 0.0
    torch.testing.assert_close(b2 @ a2, dense, rtol=1e-13, atol=1e-13)
    a3, b3, dropped = resta_factors(a, b, s, v, gamma, v_rank=2)
    u, sv, vh = torch.linalg.svd(v, full_matrices=False)
    torch.testing.assert_close(
        b3 @ a3, s * b @ a + gamma * (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-12, atol=1e-12
    )
    assert dropped == pytest.approx(abs(gamma) * float(torch.linalg.vector_norm(sv[2:])), rel=1e-12, abs=0)
    a4, b4, _ = resta_factors(a, b, s, None, gamma)  # a module without gamma V keeps s B A
    torch.testing.assert_close(b4 @ a4, s * b @ a, rtol=1e-14, atol=1e-14)
    a5, b5 = pad_rank(a2, b2, r + d_in + 4)
    assert (
        a5.shape[0] == b5.shape[1] == r + d_in + 4
        and not a5[r + d_in :].any()
        and not b5[:, r + d_in :].any()
    )
    torch.testing.assert_close(b5 @ a5, dense, rtol=1e-13, atol=1e-13)


def test_select_direction_modules():
    names = MODULES
    assert select_direction_modules(names, None) == names
    assert select_direction_modules(names, ["q_proj"]) == [n for n in names if n.endswith("q_proj")]
    assert select_direction_modules(names, ["layers.1.self_attn.v_proj"]) == [names[3]]
    assert select_direction_modules(names, r".*layers\.0\..*") == names[:2]
    with pytest.raises(ArgumentError, match=r"modules: 'k_proj' matches none of the direction's modules"):
        select_direction_modules(names, ["q_proj", "k_proj"])
    with pytest.raises(ArgumentError, match=r"the regex 'q_proj' matches none .*'\.\*q_proj'"):
        select_direction_modules(names, "q_proj")
    with pytest.raises(ArgumentError, match=r"not a valid regular expression"):
        select_direction_modules(names, "(")
    with pytest.raises(ArgumentError, match=r"empty list"):
        select_direction_modules(names, [])


# ---------------------------------------------------------------- adapter output


def _check_adapter_output(
    out: Path, adapter: str, direction: str, gamma: float, chosen: set[str], v_rank=None
):
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    report = json.loads((out / REPORT_NAME).read_text())
    ds = load_direction(direction)
    rank = report["rank"]
    assert config["r"] == config["lora_alpha"] == rank and config["use_rslora"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    for m in MODULES:
        a, b = _lora(adapter, m)
        a2, b2 = _lora(str(out), m)
        assert a2.shape == (rank, a.shape[1]) and b2.shape == (b.shape[0], rank)
        v = ds.modules[m].direction.double()
        if m in chosen and v_rank is not None:
            u, s, vh = torch.linalg.svd(v, full_matrices=False)
            v = (u[:, :v_rank] * s[:v_rank]) @ vh[:v_rank]
        expected = (ALPHA / R) * b @ a + (gamma * v if m in chosen else 0)
        torch.testing.assert_close(b2 @ a2, expected, rtol=1e-5, atol=1e-6)  # float32 storage
        assert report["modules"][m]["gamma_V"] is (m in chosen)
    return report


def test_adapter_output_exact(adapter, direction, tmp_path, capsys):
    out = tmp_path / "out"
    before = _snapshot(adapter) | _snapshot(direction)
    report = resta(direction, str(out), adapter=adapter, gamma=0.7)
    assert _snapshot(adapter) | _snapshot(direction) == before  # inputs untouched
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "output": str(out),
        "output_format": "adapter",
        "modules": 4,
        "with_gamma_V": 4,
        "gamma": 0.7,
        "rank": R + 32,
    }
    # q_proj is 32 x 32, v_proj 16 x 32: exact factors of rank 32 and 16, all padded to r + 32
    assert report["rank"] == R + 32
    assert [report["modules"][m]["factor_rank"] for m in MODULES] == [R + 32, R + 16] * 2
    assert all(report["modules"][m]["dropped_fro"] == 0.0 for m in MODULES)
    _check_adapter_output(out, adapter, direction, 0.7, set(MODULES))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_NAME]
    )
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as fh:
        assert json.loads(fh.metadata()["asft_resta"])["settings"]["gamma"] == 0.7
    assert _leftovers(tmp_path) == []


def test_adapter_output_truncated_and_selected(adapter, direction, tmp_path):
    out = tmp_path / "out"
    report = resta(direction, str(out), adapter=adapter, gamma=1.5, v_rank=3, modules=["q_proj"])
    chosen = {m for m in MODULES if m.endswith("q_proj")}
    assert report["rank"] == R + 3 and report["num_with_direction"] == 2
    _check_adapter_output(out, adapter, direction, 1.5, chosen, v_rank=3)
    ds = load_direction(direction)
    for m in chosen:
        v = ds.modules[m].direction.double()
        s = torch.linalg.svdvals(v)
        assert report["modules"][m]["dropped_fro"] == pytest.approx(
            1.5 * float(torch.linalg.vector_norm(s[3:])), rel=1e-9
        )
        assert 0 < report["modules"][m]["dropped_relative"] < 1
    assert all("dropped_fro" not in report["modules"][m] for m in MODULES if m not in chosen)


def test_adapter_output_loads_and_merges_with_peft(tiny_world, adapter, direction, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    resta(direction, str(out), adapter=adapter, gamma=1.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"], dtype=torch.float32)
    weights = {k: v.detach().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload().state_dict()
    ds = load_direction(direction)
    for m in MODULES:
        a, b = _lora(adapter, m)
        expected = weights[f"{m}.weight"].double() + (ALPHA / R) * b @ a + ds.modules[m].direction.double()
        torch.testing.assert_close(merged[f"{m}.weight"].double(), expected, rtol=1e-5, atol=1e-5)


def test_adapter_alpha_pattern_and_rslora(tiny_world, direction, tmp_path):
    """The scaling PEFT would apply (alpha_pattern, rsLoRA) is the one folded into B."""
    for extra, scale in (
        ({"alpha_pattern": {"v_proj": 2}}, {"q_proj": ALPHA / R, "v_proj": 2 / R}),
        ({"use_rslora": True}, {"q_proj": ALPHA / R**0.5, "v_proj": ALPHA / R**0.5}),
    ):
        ad = make_adapter(
            tiny_world["aligned"], tmp_path / f"ad{len(extra)}{next(iter(extra))}", seed=4, **extra
        )
        out = tmp_path / f"out-{next(iter(extra))}"
        resta(direction, str(out), adapter=ad, gamma=0.0)
        for m in MODULES:
            a, b = _lora(ad, m)
            a2, b2 = _lora(str(out), m)
            torch.testing.assert_close(b2 @ a2, scale[m.rsplit(".", 1)[1]] * b @ a, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- model output


def test_model_output_from_adapter(tiny_world, adapter, direction, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    before = _snapshot(tiny_world["aligned"]) | _snapshot(adapter)
    report = resta(
        direction, str(out), model=tiny_world["aligned"], adapter=adapter, gamma=0.5, modules=["v_proj"]
    )
    assert _snapshot(tiny_world["aligned"]) | _snapshot(adapter) == before
    assert json.loads(capsys.readouterr().out)["output_format"] == "model"
    base_dir = Path(tiny_world["aligned"])
    # the shard layout, index and side files are those of the base model
    base_files = sorted(p.name for p in base_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(base_files + [REPORT_NAME])
    assert (out / "model.safetensors.index.json").read_bytes() == (
        base_dir / "model.safetensors.index.json"
    ).read_bytes()
    assert (out / "config.json").read_bytes() == (base_dir / "config.json").read_bytes()
    base, new = _weights(str(base_dir)), _weights(str(out))
    assert sorted(base) == sorted(new)
    ds = load_direction(direction)
    for key, w in base.items():
        m = key.removesuffix(".weight")
        if m in MODULES:
            a, b = _lora(adapter, m)
            expected = (
                w.double()
                + (ALPHA / R) * b @ a
                + (0.5 * ds.modules[m].direction.double() if m.endswith("v_proj") else 0)
            )
            torch.testing.assert_close(
                new[key], expected.float(), rtol=1e-6, atol=1e-7
            )  # float64 sum, rounded once
        else:
            assert torch.equal(new[key], w), key
    assert sorted(report["edited_tensors"]) == sorted(f"{m}.weight" for m in MODULES)
    model = AutoModelForCausalLM.from_pretrained(str(out))  # loads like any checkpoint
    torch.testing.assert_close(model.state_dict()[f"{MODULES[1]}.weight"], new[f"{MODULES[1]}.weight"])


def test_model_output_full_finetune(tiny_world, direction, tmp_path):
    """No adapter: a full fine-tune gets W + gamma V on the chosen modules, nothing else changes."""
    out = tmp_path / "ft-resta"
    report = resta(direction, str(out), model=tiny_world["unaligned"], gamma=1.0, modules=r".*layers\.1\..*")
    assert report["settings"]["output_format"] == "model" and report["num_with_direction"] == 2
    base, new = _weights(tiny_world["unaligned"]), _weights(str(out))
    ds = load_direction(direction)
    for key, w in base.items():
        m = key.removesuffix(".weight")
        if m in MODULES[2:]:
            torch.testing.assert_close(
                new[key], (w.double() + ds.modules[m].direction.double()).float(), rtol=1e-6, atol=1e-7
            )
        else:
            assert torch.equal(new[key], w), key
    # gamma 1 on the unaligned model with V = aligned - unaligned gives the aligned weights of layer 1
    aligned = _weights(tiny_world["aligned"])
    for m in MODULES[2:]:
        torch.testing.assert_close(new[f"{m}.weight"], aligned[f"{m}.weight"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- bad input


def _expect(error, match, out: Path, watch: list[str], **kwargs):
    before = {}
    for w in watch:
        before |= _snapshot(w)
    with pytest.raises(error, match=match):
        resta(**kwargs, output=str(out))
    after = {}
    for w in watch:
        after |= _snapshot(w)
    assert after == before, "an input was modified"
    assert not out.exists() and _leftovers(out.parent) == []


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), -float("inf"), "1.0", True])
def test_gamma_not_finite(adapter, direction, tmp_path, gamma):
    _expect(
        ArgumentError,
        r"gamma must be a finite number",
        tmp_path / "out",
        [adapter],
        direction=direction,
        adapter=adapter,
        gamma=gamma,
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"output_format": "adapter"}, ArgumentError, r"output_format 'adapter' needs adapter"),
        ({"output_format": "weights"}, ArgumentError, r"output_format must be 'model' or 'adapter'"),
        ({"v_rank": 0, "adapter": True}, ArgumentError, r"v_rank must be an integer >= 1"),
        ({"v_rank": 2}, ArgumentError, r"v_rank only applies to output_format 'adapter'"),
        ({"modules": ["k_proj"]}, ArgumentError, r"modules: 'k_proj' matches none"),
    ],
)
def test_bad_arguments(tiny_world, adapter, direction, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    if kwargs.pop("adapter", None):
        kwargs["adapter"] = adapter
    else:
        kwargs.setdefault("model", tiny_world["aligned"])
    _expect(error, match, tmp_path / "out", [tiny_world["aligned"]], direction=direction, **kwargs)
    with pytest.raises(ArgumentError, match=r"give model .* and/or adapter"):
        resta(direction, str(tmp_path / "out"))
    with pytest.raises(ArgumentError, match=r"output_format 'model' merges the adapter .* give model"):
        resta(direction, str(tmp_path / "out"), adapter=adapter, output_format="model")


def test_direction_for_other_modules(tiny_world, adapter, tmp_path):
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
        rf"{q_only}: made for another set of modules: no direction for 2 targeted module\(s\) of .*v_proj",
        tmp_path / "out",
        [adapter, str(q_only)],
        direction=str(q_only),
        adapter=adapter,
    )
    # and an adapter on q_proj only against a q/v direction
    q_adapter = make_adapter(tiny_world["aligned"], tmp_path / "qad", seed=5, targets=["q_proj"])
    qv = tmp_path / "qv.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(qv), hash_inputs=False)
    _expect(
        DirectionError,
        r"made for another set of modules: 2 direction\(s\) for modules .* does not target",
        tmp_path / "out",
        [q_adapter],
        direction=str(qv),
        adapter=q_adapter,
    )


def test_lowrank_direction_is_refused(tiny_world, adapter, tmp_path):
    low = tmp_path / "low.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(low), rank=2, hash_inputs=False)
    _expect(
        DirectionError,
        rf"{low}: module .* stores only a low-rank basis .*without --rank / --energy",
        tmp_path / "out",
        [adapter],
        direction=str(low),
        adapter=adapter,
    )


def test_model_of_another_architecture(tiny_world, adapter, direction, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_world["aligned"])
    wide = tmp_path / "wide"
    LlamaForCausalLM(tiny_llama_config(len(tok), hidden=48)).save_pretrained(str(wide))
    for extra in ({}, {"adapter": adapter}):
        _expect(
            DirectionError,
            rf"{direction}: made for another model than model {wide} \(hidden_size: file has 32, model has 48",
            tmp_path / "out",
            [str(wide), adapter],
            direction=direction,
            model=str(wide),
            **extra,
        )
    _expect(
        CheckpointError,
        r"checkpoint not found",
        tmp_path / "out",
        [adapter],
        direction=direction,
        model=str(tmp_path / "missing"),
    )


def test_bad_adapters(tiny_world, adapter, direction, tmp_path):
    _expect(
        RestaError,
        r"adapter directory not found",
        tmp_path / "out",
        [],
        direction=direction,
        adapter=str(tmp_path / "nope"),
    )
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / ADAPTER_CONFIG).read_text())
    (dora / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    _expect(
        RestaError,
        r"a DoRA adapter .*RESTA is defined for plain LoRA only",
        tmp_path / "out",
        [str(dora)],
        direction=direction,
        adapter=str(dora),
    )
    assert issubclass(RestaError, ValueError) and not issubclass(RestaError, AdapterError)
    # an adapter with modules_to_save cannot be merged into the model (but can be carried as an adapter)
    saved = make_adapter(tiny_world["aligned"], tmp_path / "saved", seed=6, modules_to_save=["lm_head"])
    _expect(
        RestaError,
        r"holds tensors besides the LoRA factors .*use output_format adapter",
        tmp_path / "out",
        [saved],
        direction=direction,
        adapter=saved,
        model=tiny_world["aligned"],
    )
    resta(direction, str(tmp_path / "carried"), adapter=saved)
    state_in, state_out = (
        load_file(f"{saved}/{ADAPTER_WEIGHTS}"),
        load_file(str(tmp_path / "carried" / ADAPTER_WEIGHTS)),
    )
    others = [k for k in state_in if "lora_" not in k]
    assert others and all(torch.equal(state_in[k], state_out[k]) for k in others)


def test_outputs_that_clash(tiny_world, adapter, direction, tmp_path):
    copy = tmp_path / "in"
    shutil.copytree(adapter, copy)
    for out in (copy, copy / "sub", tmp_path):
        with pytest.raises(RestaError, match=r"must not be the input adapter directory"):
            resta(direction, str(out), adapter=str(copy), overwrite=True)
    with pytest.raises(RestaError, match=r"must not be the input model directory"):
        resta(direction, tiny_world["aligned"], model=tiny_world["aligned"], overwrite=True)
    out = tmp_path / "out"
    resta(direction, str(out), adapter=adapter)
    first = _snapshot(out)
    with pytest.raises(OutputExistsError, match=rf"{out}: exists and is not empty; pass overwrite=True"):
        resta(direction, str(out), adapter=adapter, gamma=2.0)
    assert _snapshot(out) == first
    resta(direction, str(out), adapter=adapter, gamma=2.0, overwrite=True)
    assert json.loads((out / REPORT_NAME).read_text())["settings"]["gamma"] == 2.0


def test_failed_write_leaves_no_trace(tiny_world, adapter, direction, tmp_path, monkeypatch):
    """Interrupted half way through the shards: no output; an existing output survives a failed overwrite."""
    import asft_lightning.resta as rs

    real = rs.save_file
    calls = []

    def interrupted(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    out = tmp_path / "out"
    monkeypatch.setattr(rs, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resta(direction, str(out), model=tiny_world["aligned"], adapter=adapter)
    assert len(calls) == 2 and not out.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(rs, "save_file", real)
    resta(direction, str(out), model=tiny_world["aligned"], adapter=adapter)
    first = _snapshot(out)
    calls.clear()
    monkeypatch.setattr(rs, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resta(direction, str(out), model=tiny_world["aligned"], adapter=adapter, gamma=3.0, overwrite=True)
    assert _snapshot(out) == first and _leftovers(tmp_path) == []


def test_killed_run_leaves_no_output(tiny_world, adapter, direction, tmp_path):
    """SIGKILL between two shards: the output path never exists (only a hidden temporary stays behind)."""
    out = tmp_path / "out"
    flag = tmp_path / "first-shard-written"
    script = f"""
import pathlib, time, sys
import asft_lightning.resta as rs
real = rs.save_file
def slow(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    pathlib.Path({str(flag)!r}).touch()
    time.sleep(60)
rs.save_file = slow
from asft_lightning.cli import main
main(["resta", "--direction={direction}", "--model={tiny_world["aligned"]}", "--adapter={adapter}", "--output={out}"])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert flag.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    temps = _leftovers(tmp_path)
    assert len(temps) == 1 and temps[0].startswith(".out.")  # the build directory, never at the output path


# ---------------------------------------------------------------- the command line


def test_cli_adapter_and_model(tiny_world, adapter, direction, tmp_path, capsys):
    from asft_lightning.cli import main

    out = tmp_path / "cli-adapter"
    main(
        [
            "resta",
            f"--direction={direction}",
            f"--adapter={adapter}",
            f"--output={out}",
            "--gamma=0.25",
            "--v_rank=4",
            "--modules=[v_proj]",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_format"] == "adapter" and printed["with_gamma_V"] == 2 and printed["rank"] == R + 4
    _check_adapter_output(
        out, adapter, direction, 0.25, {m for m in MODULES if m.endswith("v_proj")}, v_rank=4
    )

    merged = tmp_path / "cli-model"
    main(
        [
            "resta",
            f"--direction={direction}",
            f"--adapter={adapter}",
            f"--model={tiny_world['aligned']}",
            f"--output={merged}",
        ]
    )
    assert json.loads(capsys.readouterr().out)["output_format"] == "model"
    base, new = _weights(tiny_world["aligned"]), _weights(str(merged))
    ds = load_direction(direction)
    for m in MODULES:
        a, b = _lora(adapter, m)
        want = base[f"{m}.weight"].double() + (ALPHA / R) * b @ a + ds.modules[m].direction.double()
        torch.testing.assert_close(new[f"{m}.weight"], want.float(), rtol=1e-6, atol=1e-7)
    # the parser refuses 'nan' / 'inf' itself; YAML's .inf and an overflowing 1e400 reach resta's own check
    base = ["resta", f"--direction={direction}", f"--adapter={adapter}", f"--output={tmp_path / 'x'}"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--gamma=nan"])
    assert exc.value.code == 2 and 'Parser key "gamma"' in capsys.readouterr().err
    for value in (".inf", "1e400", "-.inf"):
        with pytest.raises(ArgumentError, match=r"gamma must be a finite number .* got -?inf"):
            main([*base, f"--gamma={value}"])
    assert not (tmp_path / "x").exists() and _leftovers(tmp_path) == []
