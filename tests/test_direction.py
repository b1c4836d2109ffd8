"""Alignment-direction extraction on the tiny offline world: values, metadata, projector forms, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asft_lightning.checkpoints import CheckpointError
from asft_lightning.direction import (
    DirectionError,
    DirectionSet,
    extract_direction,
    load_direction,
    module_matches,
)
from asft_lightning.tiny import build_tiny_world, tiny_llama_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
QV += [n.replace("layers.0", "layers.1") for n in QV]
QV = sorted(QV)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """The tiny aligned (3 shards + index) / unaligned (one file) Llama pair (short training: speed). Never modified."""
    return build_tiny_world(tmp_path_factory.mktemp("world"), train_steps=20)


@pytest.fixture(scope="module")
def state_dicts(world) -> dict[str, dict[str, torch.Tensor]]:
    """Both models loaded the ordinary way, in float32."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name in ("aligned", "unaligned"):
        model = AutoModelForCausalLM.from_pretrained(world[name], dtype=torch.float32)
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def reference_V(state_dicts) -> dict[str, torch.Tensor]:
    """``V = W_aligned - W_unaligned`` by in-memory subtraction, for every q_proj / v_proj."""
    a, u = state_dicts["aligned"], state_dicts["unaligned"]
    return {k[: -len(".weight")]: a[k] - u[k] for k in a if k.endswith(("q_proj.weight", "v_proj.weight"))}


@pytest.fixture(scope="module")
def full_direction(world, tmp_path_factory) -> DirectionSet:
    out = tmp_path_factory.mktemp("dir") / "v.safetensors"
    return extract_direction(world["aligned"], world["unaligned"], str(out))


def _snapshot(*roots: str | Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``roots``."""
    snap = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                snap[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return snap


def _copy_world(world: dict[str, str], dest: Path) -> dict[str, str]:
    """A private copy of the world's two checkpoints, safe to damage."""
    out = {}
    for name in ("aligned", "unaligned"):
        shutil.copytree(world[name], dest / name)
        out[name] = str(dest / name)
    return out


def _aligned_shards(path: str) -> list[Path]:
    return sorted(Path(path).glob("model-*-of-*.safetensors"))


# ---------------------------------------------------------------- values and metadata


def test_world_layout(world):
    assert len(_aligned_shards(world["aligned"])) == 3
    assert (Path(world["aligned"]) / "model.safetensors.index.json").is_file()
    assert (Path(world["unaligned"]) / "model.safetensors").is_file()


def test_extraction_equals_in_memory_subtraction(full_direction, reference_V):
    assert sorted(full_direction.modules) == QV == sorted(reference_V)
    for name, v in reference_V.items():
        md = full_direction.modules[name]
        assert md.direction is not None and md.basis is None and md.weights is None
        assert md.direction.dtype == torch.float32
        assert torch.equal(md.direction, v), name
        assert md.shape == tuple(v.shape)
        torch.testing.assert_close(md.norm.double(), torch.linalg.vector_norm(v.double()), rtol=1e-6, atol=0)
        assert float(md.norm) > 0


def test_extraction_float64_matches_and_keeps_norm_exact(world, reference_V, tmp_path):
    ds = extract_direction(
        world["aligned"], world["unaligned"], str(tmp_path / "v.safetensors"), dtype="float64"
    )
    for name, v in reference_V.items():
        md = ds.modules[name]
        assert md.direction.dtype == torch.float64
        assert torch.equal(md.direction, v.double())
        torch.testing.assert_close(md.norm, torch.linalg.vector_norm(v.double()), rtol=1e-14, atol=0)


def test_metadata(full_direction, world, state_dicts):
    meta = full_direction.metadata
    assert meta["format_version"] == 1
    assert meta["modules"] == {n: list(state_dicts["aligned"][n + ".weight"].shape) for n in QV}
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    assert meta["modules"]["model.layers.0.self_attn.v_proj"] == [16, 32]
    assert meta["projector"] == {"kind": "safelora", "rank": None, "energy": None, "lowrank": False}
    assert full_direction.projector == "safelora"
    assert meta["dtype"] == "float32"
    assert meta["reference"] == "base"
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["architecture"]["hidden_size"] == 32 and meta["architecture"]["model_type"] == "llama"
    assert meta["aligned"]["path"] == str(Path(world["aligned"]).resolve())
    assert meta["unaligned"]["path"] == str(Path(world["unaligned"]).resolve())
    # sha256 of every shard the weights come from: 3 for the aligned model, 1 for the unaligned one.
    for name, n_files in (("aligned", 3), ("unaligned", 1)):
        hashes = meta[name]["sha256"]
        assert len(hashes) == n_files
        for path, digest in hashes.items():
            assert Path(path).parent.resolve() == Path(world[name]).resolve()
            assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert {Path(p).name for p in meta["aligned"]["sha256"]} == {
        p.name for p in _aligned_shards(world["aligned"])
    }
    for name in QV:
        spec = meta["spectrum"][name]
        s = torch.linalg.svdvals(full_direction.modules[name].direction.double())
        assert spec["top_singular_values"] == pytest.approx(s[:8].tolist(), rel=1e-6)
        assert spec["top_C_eigenvalue_safelora"] == pytest.approx(
            float(s[0] ** 2 / s.square().sum().sqrt()), rel=1e-6
        )


def test_json_sidecar_equals_header(full_direction):
    path = Path(full_direction.path)
    sidecar = path.with_name(path.name + ".json")
    assert sidecar.is_file()
    assert json.loads(sidecar.read_text()) == full_direction.metadata
    # No temporary files are left next to the output.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, sidecar.name]


def test_load_direction_roundtrip(full_direction):
    again = load_direction(full_direction.path)
    assert again.metadata == full_direction.metadata
    for name, md in full_direction.modules.items():
        assert torch.equal(again.modules[name].direction, md.direction)
        assert torch.equal(again.modules[name].norm, md.norm)


def test_extraction_does_not_touch_inputs(world, tmp_path):
    before = _snapshot(world["aligned"], world["unaligned"])
    extract_direction(world["aligned"], world["unaligned"], str(tmp_path / "v.safetensors"))
    extract_direction(
        world["aligned"], world["unaligned"], str(tmp_path / "s.safetensors"), projector="subspace", rank=2
    )
    assert _snapshot(world["aligned"], world["unaligned"]) == before


# ---------------------------------------------------------------- low-rank forms


@pytest.mark.parametrize("k", [1, 3, 16])
def test_subspace_basis_is_top_k_left_singular_vectors(world, reference_V, tmp_path, k):
    ds = extract_direction(
        world["aligned"],
        world["unaligned"],
        str(tmp_path / "s.safetensors"),
        projector="subspace",
        rank=k,
        dtype="float64",
    )
    assert ds.projector == "subspace" and ds.metadata["projector"]["rank"] == k
    for name, v in reference_V.items():
        md = ds.modules[name]
        assert md.direction is None and md.weights is None
        u = md.basis
        assert u.shape == (v.shape[0], k)
        torch.testing.assert_close(u.mT @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
        u_ref, s_ref, _ = torch.linalg.svd(v.double(), full_matrices=False)
        # Equal up to the sign of each column.
        signs = torch.sign((u * u_ref[:, :k]).sum(0))
        assert torch.all(signs != 0)
        torch.testing.assert_close(u * signs, u_ref[:, :k], rtol=0, atol=1e-10)
        spec = ds.metadata["spectrum"][name]
        assert spec["k"] == k
        kept = float(s_ref[:k].square().sum() / s_ref.square().sum())
        assert spec["energy_kept"] == pytest.approx(kept, rel=1e-12)


def test_lowrank_safelora_weights_are_C_eigenvalues(world, reference_V, tmp_path):
    k = 4
    ds = extract_direction(
        world["aligned"], world["unaligned"], str(tmp_path / "l.safetensors"), rank=k, dtype="float64"
    )
    assert ds.projector == "safelora" and ds.metadata["projector"]["lowrank"] is True
    for name, v in reference_V.items():
        md = ds.modules[name]
        s = torch.linalg.svdvals(v.double())
        torch.testing.assert_close(
            md.weights, s[:k] ** 2 / torch.linalg.vector_norm(v.double()), rtol=1e-12, atol=0
        )
        # Against the dense published C on a random B: C_k B is the top-k part of C B.
        b = torch.randn(v.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        v64 = v.double()
        c_dense = v64 @ v64.mT / torch.linalg.matrix_norm(v64)
        u = md.basis
        torch.testing.assert_close(md.apply(b), u @ (u.mT @ (c_dense @ b)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("energy", [0.3, 0.5, 0.9, 0.99, 1.0])
def test_energy_threshold_picks_smallest_k(world, reference_V, tmp_path, energy):
    ds = extract_direction(
        world["aligned"],
        world["unaligned"],
        str(tmp_path / "e.safetensors"),
        projector="subspace",
        energy=energy,
    )
    for name, v in reference_V.items():
        s2 = torch.linalg.svdvals(v.double()).square()
        share = torch.cumsum(s2, 0) / s2.sum()
        # Smallest k with share[k-1] >= energy (all of them if rounding keeps the total just below 1).
        k_ref = next((i + 1 for i in range(s2.numel()) if share[i] >= energy), s2.numel())
        md = ds.modules[name]
        assert md.basis.shape[1] == k_ref, (name, energy)
        assert ds.metadata["spectrum"][name]["k"] == k_ref
        assert ds.metadata["spectrum"][name]["energy_kept"] >= energy - 1e-12
        if k_ref > 1:
            assert float(share[k_ref - 2]) < energy


def test_regex_target_modules(world, tmp_path):
    regex = r"model\.layers\.0\.self_attn\.(q|k)_proj"
    ds = extract_direction(
        world["aligned"], world["unaligned"], str(tmp_path / "r.safetensors"), target_modules=regex
    )
    assert sorted(ds.modules) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    assert ds.modules["model.layers.0.self_attn.k_proj"].shape == (16, 32)
    assert ds.metadata["target_modules"] == regex
    # A list is a list of name suffixes; a plain string is a regex over the full name (PEFT semantics).
    assert module_matches("model.layers.0.mlp.up_proj", ["up_proj"])
    assert not module_matches("model.layers.0.mlp.up_proj", "up_proj")
    assert module_matches("model.layers.0.mlp.up_proj", r".*\.up_proj")
    ds = extract_direction(
        world["aligned"], world["unaligned"], str(tmp_path / "m.safetensors"), target_modules=["down_proj"]
    )
    assert sorted(ds.modules) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert ds.modules["model.layers.0.mlp.down_proj"].shape == (32, 64)


# ---------------------------------------------------------------- bad inputs: extraction


@pytest.fixture(scope="module")
def other_architecture(world, tmp_path_factory) -> str:
    """A tiny Llama with hidden size 48 (same vocabulary, same module names, other shapes)."""
    from transformers import LlamaForCausalLM

    vocab = json.loads((Path(world["aligned"]) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab, hidden=48))
    path = tmp_path_factory.mktemp("other") / "wide"
    model.save_pretrained(path)
    return str(path)


def test_different_architecture_is_refused(world, other_architecture, tmp_path):
    for a, u in ((world["aligned"], other_architecture), (other_architecture, world["unaligned"])):
        with pytest.raises(
            CheckpointError, match=r"different architectures.*hidden_size: (32 vs 48|48 vs 32)"
        ):
            extract_direction(a, u, str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def _rewrite_unaligned(world, dest: Path, edit) -> str:
    """A copy of the unaligned checkpoint (same config) whose tensors went through ``edit(dict)``."""
    shutil.copytree(world["unaligned"], dest)
    tensors = load_file(str(dest / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def test_tensor_shape_mismatch_is_refused(world, tmp_path):
    key = "model.layers.1.self_attn.v_proj.weight"

    def shrink(t):
        t[key] = t[key][:, :31].contiguous()

    bad = _rewrite_unaligned(world, tmp_path / "unaligned", shrink)
    with pytest.raises(
        CheckpointError, match=rf"tensor '{key}' has shape \(16, 32\) in .* but \(16, 31\) in"
    ):
        extract_direction(world["aligned"], bad, str(tmp_path / "x.safetensors"))


def test_missing_tensor_is_refused(world, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = _rewrite_unaligned(world, tmp_path / "unaligned", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' missing"):
        extract_direction(world["aligned"], bad, str(tmp_path / "x.safetensors"))


def test_non_finite_weights_are_refused(world, tmp_path):
    key = "model.layers.0.self_attn.v_proj.weight"

    def poison(t):
        t[key][0, 0] = float("nan")

    bad = _rewrite_unaligned(world, tmp_path / "unaligned", poison)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': non-finite"):
        extract_direction(world["aligned"], bad, str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("targets", [["nonexistent_proj"], "q_proj", r"lm_head\.bias"])
def test_target_modules_matching_nothing(world, tmp_path, targets):
    with pytest.raises(DirectionError, match=r"match no linear weight in .*aligned.*q_proj"):
        extract_direction(
            world["aligned"], world["unaligned"], str(tmp_path / "x.safetensors"), target_modules=targets
        )


def test_missing_checkpoint_dir(world, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=rf"{missing}: checkpoint not found"):
        extract_direction(str(missing), world["unaligned"], str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{missing}: checkpoint not found"):
        extract_direction(world["aligned"], str(missing), str(tmp_path / "x.safetensors"))


def test_directory_without_weights_or_config(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        extract_direction(str(empty), world["unaligned"], str(tmp_path / "x.safetensors"))
    shutil.copy(Path(world["aligned"]) / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        extract_direction(str(empty), world["unaligned"], str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "header", "json"])
def test_corrupt_shard(world, tmp_path, damage):
    copy = _copy_world(world, tmp_path / "copy")
    shard = _aligned_shards(copy["aligned"])[1]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-100])
    elif damage == "header":
        shard.write_bytes(b"\xff" * 8 + data[8:])
    else:
        shard.write_bytes(data[:8] + b"{not json" + data[17:])
    before = _snapshot(copy["aligned"], copy["unaligned"])
    with pytest.raises(CheckpointError, match=rf"{shard}: corrupt safetensors file"):
        extract_direction(copy["aligned"], copy["unaligned"], str(tmp_path / "x.safetensors"))
    assert _snapshot(copy["aligned"], copy["unaligned"]) == before
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_shard_and_bad_index(world, tmp_path):
    copy = _copy_world(world, tmp_path / "copy")
    shard = _aligned_shards(copy["aligned"])[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: shard listed in the index is missing"):
        extract_direction(copy["aligned"], copy["unaligned"], str(tmp_path / "x.safetensors"))
    (Path(copy["aligned"]) / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a safetensors index"):
        extract_direction(copy["aligned"], copy["unaligned"], str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projector": "dense"}, "projector must be 'safelora' or 'subspace'"),
        ({"rank": 0}, "rank must be >= 1"),
        ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
        ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
        ({"rank": 2, "energy": 0.5}, "give rank or energy, not both"),
        ({"projector": "subspace"}, "projector 'subspace' needs rank"),
    ],
)
def test_bad_settings(world, tmp_path, kwargs, message):
    with pytest.raises(DirectionError, match=message):
        extract_direction(world["aligned"], world["unaligned"], str(tmp_path / "x.safetensors"), **kwargs)


def test_output_must_be_safetensors(world, tmp_path):
    with pytest.raises(DirectionError, match=r"must end in .safetensors"):
        extract_direction(world["aligned"], world["unaligned"], str(tmp_path / "x.pt"))


def test_identical_checkpoints_are_refused(world, tmp_path):
    with pytest.raises(DirectionError, match=r"identical in .* alignment direction of module .* is zero"):
        extract_direction(world["aligned"], world["aligned"], str(tmp_path / "x.safetensors"))


# ---------------------------------------------------------------- bad inputs: load_direction


def test_load_missing_direction_file(tmp_path):
    with pytest.raises(DirectionError, match=rf"{tmp_path / 'nope.safetensors'}: direction file not found"):
        load_direction(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_load_corrupt_direction_file(full_direction, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    data = Path(full_direction.path).read_bytes()
    bad.write_bytes(os.urandom(256) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DirectionError, match=rf"{bad}: corrupt or unreadable direction file"):
        load_direction(bad)


def test_load_file_without_metadata(tmp_path, reference_V):
    plain = tmp_path / "plain.safetensors"
    save_file({f"{k}.direction": v for k, v in reference_V.items()}, str(plain))
    with pytest.raises(DirectionError, match=rf"{plain}: not an AsFT direction file"):
        load_direction(plain)


def test_load_file_with_wrong_version_or_missing_tensors(full_direction, tmp_path):
    tensors = load_file(full_direction.path)
    meta = dict(full_direction.metadata)
    path = tmp_path / "v.safetensors"
    save_file(tensors, str(path), metadata={"asft": json.dumps({**meta, "format_version": 99})})
    with pytest.raises(DirectionError, match=r"format_version 99, expected 1"):
        load_direction(path)
    name = QV[0]
    save_file(
        {k: v for k, v in tensors.items() if k != f"{name}.norm"},
        str(path),
        metadata={"asft": json.dumps(meta)},
    )
    with pytest.raises(DirectionError, match=rf"tensor '{name}.norm' missing"):
        load_direction(path)
    save_file(
        {k: v for k, v in tensors.items() if k != f"{name}.direction"},
        str(path),
        metadata={"asft": json.dumps(meta)},
    )
    with pytest.raises(DirectionError, match=rf"module {name} has neither"):
        load_direction(path)


@pytest.mark.parametrize("header", ['{"format_version": 1}', "[1]"])
def test_load_malformed_metadata_raises_direction_error(tmp_path, header):
    path = tmp_path / "m.safetensors"
    save_file({"a.norm": torch.tensor(1.0)}, str(path), metadata={"asft": header})
    with pytest.raises(DirectionError, match=rf"{path}: the 'asft' metadata"):
        load_direction(path)


# ---------------------------------------------------------------- check_modules / check_model


def test_check_modules(full_direction):
    shapes = {n: tuple(full_direction.metadata["modules"][n]) for n in QV}
    full_direction.check_modules(shapes, "the adapter")  # exact match: no error
    fewer = {k: v for k, v in shapes.items() if "v_proj" not in k}
    with pytest.raises(
        DirectionError, match=r"another set of modules: 2 direction\(s\) for modules the adapter does not"
    ):
        full_direction.check_modules(fewer, "the adapter")
    more = {**shapes, "model.layers.0.self_attn.k_proj": (16, 32)}
    with pytest.raises(
        DirectionError, match=r"no direction for 1 targeted module\(s\) of the adapter.*k_proj"
    ):
        full_direction.check_modules(more, "the adapter")
    other = {k.replace("self_attn", "attn"): v for k, v in shapes.items()}
    with pytest.raises(DirectionError, match=r"no direction for 4 .*; 4 direction\(s\)"):
        full_direction.check_modules(other, "the adapter")
    wrong = {**shapes, QV[0]: (48, 48)}
    with pytest.raises(
        DirectionError, match=rf"module {QV[0]} has shape \(32, 32\) in the direction file but \(48, 48\)"
    ):
        full_direction.check_modules(wrong, "the adapter")


def test_check_model(full_direction, world):
    from asft_lightning.checkpoints import architecture_fingerprint

    cfg = json.loads((Path(world["aligned"]) / "config.json").read_text())
    full_direction.check_model(architecture_fingerprint(cfg), "the model")
    with pytest.raises(
        DirectionError, match=r"made for another model than the model \(hidden_size: file has 32"
    ):
        full_direction.check_model(architecture_fingerprint({**cfg, "hidden_size": 48}), "the model")
