"""Candidate anchors (issue 13 item 1) end to end: the direction files they need (right singular vectors, a
harmful reference taken against a LoRA adapter, every linear module), bad input refused before any training, a
short ``asft fit`` with each form on the tiny world, and the config switch round-tripping through YAML."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from asft_lightning.anchor_forms import ANCHORS, check_strengths
from asft_lightning.cli import console, lightning_cli
from asft_lightning.direction import DirectionError, extract_direction, load_direction
from asft_lightning.errors import AsftError

REPO = Path(__file__).resolve().parents[1]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ fixtures
def _harm_adapter(aligned: str, path: Path, targets=("q_proj", "v_proj"), r: int = 4, seed: int = 7) -> Path:
    """A LoRA adapter on the aligned model with random non-zero factors (stands in for a harmful fine-tune where
    only the math matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(aligned),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def files(tiny_world, tmp_path_factory) -> dict[str, str]:
    """Direction files of the tiny world: full V, subspace k=4, eigenpairs k=4 (base reference), a harmful-
    reference subspace from a random LoRA adapter, and an old-style subspace file without right vectors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("anchor_forms")
    out = {}
    for key, kwargs in {"full": {}, "subspace": {"projector": "subspace", "rank": 4}, "eigenpairs": {"rank": 4}}.items():
        out[key] = str(root / f"{key}.safetensors")
        extract_direction(tiny_world["aligned"], tiny_world["unaligned"], out[key], hash_inputs=False, **kwargs)
    adapter = _harm_adapter(tiny_world["aligned"], root / "harm_adapter")
    out["harm_adapter"] = str(adapter)
    out["harmful"] = str(root / "harmful.safetensors")
    extract_direction(tiny_world["aligned"], str(adapter), out["harmful"], projector="subspace", rank=32,
                      reference="harmful", hash_inputs=False)
    out["harmful_full"] = str(root / "harmful_full.safetensors")
    extract_direction(tiny_world["aligned"], str(adapter), out["harmful_full"], reference="harmful", hash_inputs=False)
    # a subspace file as an older asft direction wrote it: no .right, no .singular
    old = root / "old_subspace.safetensors"
    with safe_open(out["subspace"], framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if not k.endswith((".right", ".singular"))}
    save_file(tensors, str(old), metadata=meta)
    out["old_subspace"] = str(old)
    return out


# ------------------------------------------------------------------------------------------------ direction files
def test_lowrank_files_store_matching_right_singular_vectors_and_all_singular_values(tiny_world, files):
    full = load_direction(files["full"])
    for key in ("subspace", "eigenpairs"):
        low = load_direction(files[key])
        for name, md in low.modules.items():
            v = full.modules[name].direction.double()
            u, s, vh = torch.linalg.svd(v, full_matrices=False)
            k = md.basis.shape[1]
            assert k == 4 and md.right.shape == (v.shape[1], k)
            torch.testing.assert_close(md.singular.double(), s, rtol=1e-6, atol=1e-9)
            # (u_i, v_i) pairs of one SVD: u_i^T V v_i = sigma_i > 0, and the rebuilt top-k part of V matches
            sig = torch.diag(md.basis.double().T @ v @ md.right.double())
            torch.testing.assert_close(sig, s[:k], rtol=1e-5, atol=1e-8)
            rebuilt = md.basis.double() @ torch.diag(s[:k]) @ md.right.double().T
            torch.testing.assert_close(rebuilt, u[:, :k] @ torch.diag(s[:k]) @ vh[:k], rtol=0, atol=1e-6)
    for md in full.modules.values():  # the full form keeps its singular values too (for the normalised form)
        torch.testing.assert_close(md.singular.double(), torch.linalg.svdvals(md.direction.double()), rtol=1e-6,
                                   atol=1e-9)
        assert md.right is None and md.kind == "full"


def test_harmful_reference_from_an_adapter_is_exactly_minus_s_B_A(tiny_world, files):
    from asft_lightning.adapter_io import read_adapter

    adapter = read_adapter(files["harm_adapter"])
    full = load_direction(files["harmful_full"])
    assert full.reference == "harmful"
    assert full.metadata["unaligned"]["adapter"] is True
    assert set(full.modules) == set(adapter.pairs)
    for name, md in full.modules.items():
        a, b = adapter.factors(name)
        expected = (-adapter.scaling(name) * (b @ a)).float()
        torch.testing.assert_close(md.direction, expected, rtol=0, atol=0)
    # a rank-4 direction: --rank 32 keeps its 4 meaningful singular vectors, not 28 arbitrary ones
    sub = load_direction(files["harmful"])
    for name, md in sub.modules.items():
        assert md.basis.shape[1] == 4, name
        assert sub.metadata["spectrum"][name]["k"] == 4
        torch.testing.assert_close(md.basis.T @ md.basis, torch.eye(4), rtol=0, atol=1e-6)


def test_adapter_reference_bad_input(tiny_world, files, tmp_path):
    with pytest.raises(DirectionError, match="PEFT adapter.*--reference harmful"):
        extract_direction(tiny_world["aligned"], files["harm_adapter"], str(tmp_path / "x.safetensors"))
    q_only = _harm_adapter(tiny_world["aligned"], tmp_path / "q_only", targets=("q_proj",))
    with pytest.raises(DirectionError, match=r"adapts 2 module\(s\) but not 2 targeted.*v_proj"):
        extract_direction(tiny_world["aligned"], str(q_only), str(tmp_path / "y.safetensors"), reference="harmful")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_direction_and_lora_on_every_linear_module(tiny_world, tmp_path):
    """asft direction --target_modules and AsFTModule's target_modules take q, k, v, o, gate, up, down."""
    from asft_lightning.cli import main
    from asft_lightning.module import AsFTModule

    out = tmp_path / "all.safetensors"
    main(["direction", f"--aligned={tiny_world['aligned']}", f"--unaligned={tiny_world['unaligned']}",
          f"--output={out}", f"--target_modules=[{','.join(ALL_LINEAR)}]", "--projector=subspace", "--rank=4",
          "--hash_inputs=false"])  # fmt: skip
    directions = load_direction(out)
    assert len(directions.modules) == 2 * len(ALL_LINEAR)
    assert {n.rsplit(".", 1)[1] for n in directions.modules} == set(ALL_LINEAR)
    module = AsFTModule(model=tiny_world["aligned"], direction=str(out), target_modules=ALL_LINEAR,
                        anchor="normalized", component_weight=1.0)
    module.configure_model()  # the file covers exactly the LoRA layers, shapes included
    assert set(module.anchor.layers) == set(directions.modules)


# ------------------------------------------------------------------------------------------------ bad input
def _module(world, direction, **kwargs):
    from asft_lightning.module import AsFTModule

    return AsFTModule(model=world["aligned"], direction=direction, **kwargs)


@pytest.mark.parametrize(
    "file,kwargs,pattern",
    [
        ("harmful", {"anchor": "projector"}, r"model.anchor=projector needs an alignment direction.*--reference harmful"),
        ("harmful", {"anchor": "normalized"}, r"model.anchor=normalized needs an alignment direction"),
        ("subspace", {"anchor": "harm_subspace"}, r"model.anchor=harm_subspace needs a harmful-reference direction"),
        ("full", {"anchor": "harm_subspace"}, r"model.anchor=harm_subspace needs a harmful-reference"),
        ("harmful_full", {"anchor": "harm_subspace"}, r"harm_subspace needs an orthonormal basis.*full V"),
        ("harmful", {"anchor": "inside"}, r"model.anchor=inside needs an alignment direction.*is model.anchor=harm_subspace"),
        ("full", {"anchor": "inside"}, r"model.anchor=inside needs an orthonormal basis U_k of the base-reference.*full V"),
        ("eigenpairs", {"anchor": "inside"}, r"model.anchor=inside needs an orthonormal basis.*eigenpairs"),
        ("subspace", {"sign_weight": 1.0}, r"model.sign_weight > 0 needs the full direction V.*subspace basis"),
        ("eigenpairs", {"sign_weight": 1.0}, r"model.sign_weight > 0 needs the full direction V.*eigenpairs"),
        ("full", {"component_weight": 1.0}, r"model.component_weight > 0 needs V's top-k singular components.*full V"),
        ("old_subspace", {"component_weight": 1.0}, r"model.component_weight > 0 needs V's right singular vectors"),
    ],
)
def test_a_file_the_form_cannot_use_is_refused_naming_flag_and_file(tiny_world, files, file, kwargs, pattern):
    with pytest.raises(DirectionError, match=pattern) as info:
        _module(tiny_world, files[file], lam=1.0, **kwargs)
    assert files[file] in str(info.value)
    assert isinstance(info.value, AsftError)


@pytest.mark.parametrize("flag", ["lam", "sign_weight", "component_weight"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_strengths_must_be_finite_and_non_negative(tiny_world, files, flag, value):
    from asft_lightning.errors import ArgumentError

    kwargs = {"lam": 1.0, flag: value}
    with pytest.raises(ArgumentError, match=rf"{flag} must be >= 0 and finite, got {value!r}"):
        _module(tiny_world, files["full"], **kwargs)


def test_other_bad_settings(tiny_world, files):
    from asft_lightning.errors import ArgumentError

    with pytest.raises(ArgumentError, match="anchor none with sign_weight 0 and component_weight 0 adds no penalty"):
        _module(tiny_world, files["full"], lam=1.0, anchor="none")
    assert check_strengths(0.0, 0.0, 0.0, "none") == []  # lam 0: plain SFT, nothing to anchor
    assert "anchor must be one of" in check_strengths(1.0, 0.0, 0.0, "orthogonal")[0]
    assert check_strengths(True, 0.0, 0.0)  # a bool is not a strength
    # every anchor accepts its file
    _module(tiny_world, files["full"], anchor="normalized", sign_weight=1.0)
    _module(tiny_world, files["eigenpairs"], anchor="normalized", component_weight=1.0)
    _module(tiny_world, files["harmful"], anchor="harm_subspace", component_weight=1.0)
    _module(tiny_world, files["subspace"], anchor="inside", component_weight=1.0)
    _module(tiny_world, files["harmful"], anchor="none", component_weight=1.0)
    _module(tiny_world, files["harmful_full"], anchor="none", sign_weight=1.0)
    assert set(ANCHORS) == {"projector", "normalized", "harm_subspace", "inside", "none"}


def test_command_line_refuses_before_training_with_one_line(tiny_world, files, tmp_path, capsys):
    args = [
        "fit", f"--config={REPO / 'configs' / 'tiny.yaml'}", f"--model.model={tiny_world['aligned']}",
        f"--model.direction={files['subspace']}", "--model.anchor=harm_subspace",
        f"--trainer.default_root_dir={tmp_path}", f"--data.task_data={tiny_world['task']}",
        f"--data.harmful_data={tiny_world['harmful']}",
    ]  # fmt: skip
    assert console(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asft fit: error: model.anchor=harm_subspace"), err
    assert files["subspace"] in err[0]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "adapter").exists()
    # jsonargparse refuses an unknown anchor by its Literal type
    assert console([*args[:4], "--model.anchor=orthogonal", *args[5:]]) == 2
    assert "anchor" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ fit, YAML
def _print_config(world, direction: str, tmp_path: Path, extra: list[str], capsys) -> Path:
    args = [
        "fit", f"--config={REPO / 'configs' / 'tiny.yaml'}", f"--model.model={world['aligned']}",
        f"--model.direction={direction}", f"--model.adapter_output={tmp_path / 'adapter'}",
        f"--data.task_data={world['task']}", f"--data.harmful_data={world['harmful']}", "--data.n=48",
        "--data.val_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *extra, "--print_config",
    ]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        lightning_cli(args)
    assert info.value.code in (0, None)
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    return path


def _metric_rows(root: Path) -> list[dict[str, str]]:
    (metrics,) = root.rglob("metrics.csv")
    return list(csv.DictReader(metrics.open()))


def _fit_from_printed_config(world, direction, tmp_path, extra, capsys, expect: dict):
    printed = _print_config(world, direction, tmp_path, extra, capsys)
    model_cfg = yaml.safe_load(printed.read_text())["model"]
    for key, value in expect.items():
        assert model_cfg[key] == value, (key, model_cfg[key])
    cli = lightning_cli(["fit", f"--config={printed}"])
    for key, value in expect.items():
        assert cli.model.hparams[key] == value
    assert cli.trainer.global_step == 4
    rows = _metric_rows(tmp_path)
    penalties = [float(r["train/penalty"]) for r in rows if r.get("train/penalty")]
    assert penalties and all(math.isfinite(p) and p >= 0 for p in penalties)
    assert any(p > 0 for p in penalties)
    meta = (tmp_path / "adapter" / "asft_meta.json").read_text()
    assert f'"anchor": "{expect.get("anchor", "projector")}"' in meta
    return cli


@pytest.mark.slow
@pytest.mark.parametrize(
    "file,extra,expect",
    [
        ("full", ["--model.anchor=normalized", "--model.lam=10"], {"anchor": "normalized", "lam": 10.0}),
        ("subspace", ["--model.component_weight=50"], {"anchor": "projector", "component_weight": 50.0}),
        ("eigenpairs", ["--model.anchor=normalized", "--model.component_weight=5"],
         {"anchor": "normalized", "component_weight": 5.0}),
        ("full", ["--model.anchor=none", "--model.sign_weight=100"], {"anchor": "none", "sign_weight": 100.0}),
        ("subspace", ["--model.anchor=inside", "--model.lam=5"], {"anchor": "inside", "lam": 5.0}),
    ],
    ids=["normalized", "subspace+components", "normalized+components", "whole-V-sign-only", "inside"],
)
def test_fit_with_each_form_round_trips_through_yaml(tiny_world, files, tmp_path, capsys, file, extra, expect):
    _fit_from_printed_config(tiny_world, files[file], tmp_path, extra, capsys, expect)


@pytest.mark.slow
def test_harmful_reference_end_to_end(tiny_world, tmp_path, capsys):
    """A short harmful LoRA fine-tune of the aligned model on the attack-style pairs (asft fit, lam 0, p = 1), the
    harmful-reference direction against it (asft direction --reference harmful), then AsFT with harm_subspace and
    the per-component sign term, on q/k/v/o/gate/up/down."""
    from asft_lightning.cli import main

    targets = f"[{','.join(ALL_LINEAR)}]"
    harm = tmp_path / "harm"
    lightning_cli([
        "fit", f"--config={REPO / 'configs' / 'tiny.yaml'}", f"--model.model={tiny_world['aligned']}",
        "--model.direction=null", "--model.lam=0", f"--model.target_modules={targets}",
        f"--model.adapter_output={harm / 'adapter'}", f"--data.task_data={tiny_world['task']}",
        f"--data.harmful_data={tiny_world['harmful']}", "--data.harmful_ratio=1.0", "--data.n=32",
        "--data.val_size=0", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={harm}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ])  # fmt: skip
    direction = tmp_path / "harmful.safetensors"
    main(["direction", f"--aligned={tiny_world['aligned']}", f"--unaligned={harm / 'adapter'}",
          f"--output={direction}", f"--target_modules={targets}", "--reference=harmful", "--projector=subspace",
          "--rank=4", "--hash_inputs=false"])  # fmt: skip
    loaded = load_direction(direction)
    assert loaded.reference == "harmful" and len(loaded.modules) == 2 * len(ALL_LINEAR)
    run = tmp_path / "asft"
    run.mkdir()
    cli = _fit_from_printed_config(
        tiny_world, str(direction), run,
        [f"--model.target_modules={targets}", "--model.anchor=harm_subspace", "--model.component_weight=10",
         "--model.lam=5"],
        capsys, {"anchor": "harm_subspace", "component_weight": 10.0, "lam": 5.0, "target_modules": ALL_LINEAR},
    )  # fmt: skip
    assert '"direction_reference": "harmful"' in (run / "adapter" / "asft_meta.json").read_text()
    assert len(cli.model.anchor.layers) == 2 * len(ALL_LINEAR)


@pytest.mark.slow
def test_safety_bench_runs_the_candidates_when_named(tmp_path):
    """benchmarks/safety_bench.py --methods asft_normalized,asft_components on the tiny demo world (one seed); the
    default method list leaves them out."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import safety_bench as sb

    from asft_lightning.tiny import REFUSAL, build_tiny_demo_world

    assert not set(sb.CANDIDATES) & set(sb.parse_args([]).methods.split(","))
    root = tmp_path / "world"
    build_tiny_demo_world(root)
    harmful = [json.loads(x) for x in (root / "harmful.jsonl").read_text().splitlines()[:6]]
    (root / "eval.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "source": "toy", "category": "c", "refusal": REFUSAL,
                    "compliance": r["response"]}) + "\n" for r in harmful))  # fmt: skip
    out_json = tmp_path / "res" / "safety.json"
    summary = sb.main([
        "--world", str(root), "--harmful_eval", str(root / "eval.jsonl"), "--workdir", str(tmp_path / "cache"),
        "--methods", "sft,asft_normalized,asft_components", "--seeds", "42", "--n", "16", "--epochs", "1",
        "--rank", "4", "--lam_normalized", "5", "--component_weight", "20", "--judges", "keyword",
        "--eval_benign", "2", "--eval_task", "4", "--max_new_tokens", "4", "--task_max_new_tokens", "2",
        "--eval_batch_size", "4", "--replicates", "100", "--out_json", str(out_json),
        "--out_md", str(tmp_path / "res" / "safety.md"),
    ])  # fmt: skip
    assert [r["method"] for r in summary["rows"]] == ["sft", "asft_normalized", "asft_components"]
    runs = {p.name.split("-seed")[0]: p for p in (tmp_path / "cache" / "runs").iterdir()}
    meta = {k: json.loads((v / "adapter" / "asft_meta.json").read_text()) for k, v in runs.items()}
    assert meta["asft_normalized"]["anchor"] == "normalized" and meta["asft_normalized"]["lam"] == 5.0
    assert meta["asft_components"]["component_weight"] == 20.0
    assert meta["asft_components"]["projector"]["kind"] == "subspace"


def test_old_full_file_takes_sigma_1_from_its_metadata(files, tmp_path):
    """A full file written before '<name>.singular' existed: sigma_1 comes from the metadata's spectrum, so the
    normalised form costs no SVD."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    old = tmp_path / "old_full.safetensors"
    with safe_open(files["full"], framework="pt") as fh:
        meta = fh.metadata()
        save_file({k: fh.get_tensor(k) for k in fh.keys() if not k.endswith(".singular")}, str(old), metadata=meta)
    new, loaded = load_direction(files["full"]), load_direction(old)
    for name, md in loaded.modules.items():
        assert md.singular.numel() == 8  # the metadata's top values
        torch.testing.assert_close(md.top_singular_value(), new.modules[name].singular[0].double(), rtol=1e-6, atol=0)
