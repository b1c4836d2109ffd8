"""The in-forward penalty (LoraAnchor) gives exactly autograd of the dense published formula, in float64."""

from __future__ import annotations

import pytest
import torch

from asft_lightning.anchor import LoraAnchor, lora_layers, lora_shapes
from asft_lightning.direction import extract_direction, load_direction


def _peft_model(path: str, dtype=torch.float64, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    return model


def _dense_penalty(layer, md, include_scale: bool) -> torch.Tensor:
    """||(I - C) s B A||_F^2 with C materialised as a d_out x d_out matrix, the published way."""
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    if md.basis is not None:
        u = md.basis.double()
        w = md.weights.double() if md.weights is not None else torch.ones(u.shape[1], dtype=torch.float64)
        c = u @ torch.diag(w) @ u.T
    else:
        v = md.direction.double()
        c = v @ v.T / md.norm.double()
    delta = b @ a * (layer.scaling["default"] if include_scale else 1.0)
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    return torch.linalg.matrix_norm((eye - c) @ delta) ** 2


@pytest.mark.parametrize("projector,rank", [("safelora", None), ("subspace", 3), ("safelora", 5)])
@pytest.mark.parametrize("include_scale", [False, True])
def test_anchor_matches_dense_autograd(tiny_world, tmp_path, projector, rank, include_scale):
    path = tmp_path / "d.safetensors"
    directions = extract_direction(
        tiny_world["aligned"], tiny_world["unaligned"], str(path), projector=projector, rank=rank, dtype="float64"
    )
    model = _peft_model(tiny_world["aligned"])
    ids = torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    lam = 0.7

    def grads(use_anchor: bool):
        model.zero_grad()
        if use_anchor:
            anchor = LoraAnchor(model, directions.modules, include_lora_scale=include_scale)
            anchor.start(with_grad=True)
            logits = model(input_ids=ids).logits
            record = anchor.stop()
            anchor.remove()
            penalty = record.total_penalty()
        else:
            logits = model(input_ids=ids).logits
            penalty = sum(
                _dense_penalty(layer, directions.modules[name], include_scale)
                for name, layer in lora_layers(model).items()
            )
        loss = logits.square().mean() + lam * penalty
        loss.backward()
        return penalty.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    pen_anchor, g_anchor = grads(True)
    pen_dense, g_dense = grads(False)
    assert pen_dense > 0
    torch.testing.assert_close(pen_anchor, pen_dense, rtol=1e-11, atol=0)
    assert g_anchor.keys() == g_dense.keys()
    for key in g_dense:
        torch.testing.assert_close(g_anchor[key], g_dense[key], rtol=1e-10, atol=1e-13, msg=key)


def test_anchor_records_drift_and_is_inactive_outside_start(tiny_world, tiny_direction):
    directions = load_direction(tiny_direction)
    model = _peft_model(tiny_world["aligned"], dtype=torch.float32)
    anchor = LoraAnchor(model, directions.modules)
    ids = torch.randint(5, 40, (1, 6))
    model(input_ids=ids)  # not started: nothing recorded, no error
    assert anchor.stop().penalties == {}
    anchor.start(with_grad=False)
    with torch.no_grad():
        model(input_ids=ids)
    record = anchor.stop()
    assert set(record.penalties) == set(directions.modules) == set(lora_shapes(lora_layers(model)))
    assert all(not v.requires_grad for v in record.penalties.values())
    ratio = float(record.drift_ratio())
    per_module = record.module_drift()
    assert ratio > 0 and all(v > 0 for v in per_module.values())
    # the published C has tiny eigenvalues here, so (I - C) ~ I and the ratio is close to (but below) 1
    assert ratio < 1.0


def test_anchor_zero_update_has_zero_penalty(tiny_world, tiny_direction):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B = 0 at init
    anchor = LoraAnchor(model, load_direction(tiny_direction).modules)
    anchor.start(with_grad=True)
    model(input_ids=torch.tensor([[5, 6, 7]]))
    record = anchor.stop()
    assert float(record.total_penalty()) == 0.0
    assert float(record.drift_ratio()) == 0.0


def test_sign_aware_extension_matches_dense_autograd(tiny_world, tmp_path):
    """lam * sum_l [||(I - C) B A||^2 + w relu(-<B A, V> / ||V||)^2], in float64, against dense autograd."""
    directions = extract_direction(
        tiny_world["aligned"], tiny_world["unaligned"], str(tmp_path / "d.safetensors"), dtype="float64"
    )
    model = _peft_model(tiny_world["aligned"], seed=4)
    # make some modules move against V so the relu is active for them
    for name, layer in lora_layers(model).items():
        v = directions.modules[name].direction
        if "q_proj" in name:
            a = layer.lora_A["default"].weight
            layer.lora_B["default"].weight.data = -(v @ a.data.T) / a.data.norm() ** 2 * 3.0
    ids = torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    weight = 2.5

    def dense(layer, md):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        v = md.direction
        along = (b @ a * v).sum() / md.norm
        return _dense_penalty(layer, md, False) + weight * torch.relu(-along) ** 2

    model.zero_grad()
    anchor = LoraAnchor(model, directions.modules, sign_weight=weight)
    anchor.start(with_grad=True)
    logits = model(input_ids=ids).logits
    record = anchor.stop()
    anchor.remove()
    (logits.square().mean() + record.total_penalty()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=ids).logits
    layers = lora_layers(model)
    pen = sum(dense(layer, directions.modules[n]) for n, layer in layers.items())
    (logits.square().mean() + pen).backward()
    active = [n for n, layer in layers.items() if float(dense(layer, directions.modules[n])) >
              float(_dense_penalty(layer, directions.modules[n], False))]
    assert active, "the sign-aware term is active on no module"
    torch.testing.assert_close(record.total_penalty().detach(), pen.detach(), rtol=1e-11, atol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-13, msg=n)
    # the drift statistics leave the extension out
    for n, layer in layers.items():
        torch.testing.assert_close(record.residuals[n], _dense_penalty(layer, directions.modules[n], False).detach(),
                                   rtol=1e-11, atol=0)


# ---------------------------------------------------------------- candidate anchors (issue 13)


@pytest.fixture(scope="module")
def form_files(tiny_world, tmp_path_factory) -> dict[str, str]:
    """float64 direction files of every stored form, base reference, and a harmful-reference subspace basis taken
    against a LoRA adapter on the aligned model (its direction is exactly -s B A)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("forms")
    out = {}
    for key, kwargs in {
        "full": {},
        "eigenpairs": {"rank": 5},
        "subspace": {"projector": "subspace", "rank": 3},
    }.items():
        out[key] = str(root / f"{key}.safetensors")
        extract_direction(tiny_world["aligned"], tiny_world["unaligned"], out[key], dtype="float64", **kwargs)
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_world["aligned"])
    harm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in harm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    harm.save_pretrained(str(root / "harm_adapter"))
    out["harmful"] = str(root / "harmful.safetensors")
    extract_direction(tiny_world["aligned"], str(root / "harm_adapter"), out["harmful"], projector="subspace", rank=3,
                      reference="harmful", dtype="float64")
    return out


def _dense_C_of(md) -> torch.Tensor:
    if md.basis is not None:
        u = md.basis.double()
        w = md.weights.double() if md.weights is not None else torch.ones(u.shape[1], dtype=torch.float64)
        return u @ torch.diag(w) @ u.T
    v = md.direction.double()
    return v @ v.T / md.norm.double()


def _dense_form(layer, md, anchor: str, sign_weight: float, component_weight: float, include_scale: bool):
    """The anchor's penalty of one layer with every matrix materialised (d_out x d_out C, dense dW)."""
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    delta = b @ a * (layer.scaling["default"] if include_scale else 1.0)
    eye = torch.eye(delta.shape[0], dtype=torch.float64)
    c = _dense_C_of(md)
    if anchor == "projector":
        total = torch.linalg.matrix_norm((eye - c) @ delta) ** 2
    elif anchor == "normalized":
        c_n = c / torch.linalg.eigvalsh(c).max()  # C / lambda_max(C), from the dense matrix itself
        total = torch.linalg.matrix_norm((eye - c_n) @ delta) ** 2
    elif anchor in ("harm_subspace", "inside"):
        total = torch.linalg.matrix_norm(c @ delta) ** 2  # c = U U^T here
    else:
        total = delta.sum() * 0
    if sign_weight:
        v = md.direction.double()
        total = total + sign_weight * torch.relu(-(delta * v).sum() / torch.linalg.matrix_norm(v)) ** 2
    if component_weight:
        u, vr = md.basis.double(), md.right.double()
        coords = torch.stack([u[:, i] @ delta @ vr[:, i] for i in range(u.shape[1])])
        total = total + component_weight * (torch.relu(-coords) ** 2).sum()
    return total


FORMS = [
    # (anchor, file, sign_weight, component_weight)
    ("normalized", "full", 0.0, 0.0),
    ("normalized", "eigenpairs", 0.0, 0.0),
    ("normalized", "subspace", 0.0, 0.0),
    ("normalized", "full", 2.5, 0.0),
    ("projector", "subspace", 0.0, 4.0),
    ("normalized", "eigenpairs", 0.0, 4.0),
    ("harm_subspace", "harmful", 0.0, 0.0),
    ("harm_subspace", "harmful", 0.0, 3.0),
    ("inside", "subspace", 0.0, 0.0),
    ("inside", "subspace", 0.0, 3.0),
    ("none", "subspace", 0.0, 3.0),
    ("none", "full", 2.0, 0.0),
]


@pytest.mark.parametrize("anchor,file,sign_weight,component_weight", FORMS)
@pytest.mark.parametrize("include_scale", [False, True])
def test_anchor_forms_match_dense_autograd(tiny_world, form_files, anchor, file, sign_weight, component_weight,
                                           include_scale):
    """lam * sum_l penalty_l computed in each layer's forward equals dense autograd, values and every gradient."""
    directions = load_direction(form_files[file])
    model = _peft_model(tiny_world["aligned"], seed=3)
    ids = torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    lam = 0.7
    layers = lora_layers(model)

    def dense_total():
        return sum(
            _dense_form(layer, directions.modules[n], anchor, sign_weight, component_weight, include_scale)
            for n, layer in layers.items()
        )

    model.zero_grad()
    anchor_obj = LoraAnchor(model, directions.modules, include_lora_scale=include_scale, anchor=anchor,
                            sign_weight=sign_weight, component_weight=component_weight)
    anchor_obj.start(with_grad=True)
    logits = model(input_ids=ids).logits
    record = anchor_obj.stop()
    anchor_obj.remove()
    (logits.square().mean() + lam * record.total_penalty()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    logits = model(input_ids=ids).logits
    pen = dense_total()
    (logits.square().mean() + lam * pen).backward()
    assert float(pen) > 0
    torch.testing.assert_close(record.total_penalty().detach(), pen.detach(), rtol=1e-10, atol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-13, msg=n)
    if component_weight:  # the relu is active on some components and not on others
        coords = torch.cat([
            torch.stack([md.basis[:, i] @ (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
                         @ md.right[:, i] for i in range(md.basis.shape[1])])
            for md, layer in ((directions.modules[n], layer) for n, layer in layers.items())
        ]).detach()
        assert (coords < 0).any() and (coords > 0).any()
    # the drift statistic: the term's own ||(I - C') dW|| where it is a projector, else the file's C
    for n, layer in layers.items():
        md = directions.modules[n]
        stat_anchor = anchor if anchor in ("projector", "normalized") else "projector"
        expected = _dense_form(layer, md, stat_anchor, 0.0, 0.0, False).detach()
        torch.testing.assert_close(record.residuals[n], expected, rtol=1e-10, atol=1e-300)


def test_anchor_refuses_a_file_without_what_the_term_needs(tiny_world, form_files):
    from asft_lightning.direction import DirectionError

    model = _peft_model(tiny_world["aligned"], dtype=torch.float32)
    full = load_direction(form_files["full"]).modules
    sub = load_direction(form_files["subspace"]).modules
    with pytest.raises(DirectionError, match="component_weight > 0 needs V's top-k singular components"):
        LoraAnchor(model, full, component_weight=1.0)
    with pytest.raises(DirectionError, match="sign_weight > 0 needs the full direction V"):
        LoraAnchor(model, sub, sign_weight=1.0)
    with pytest.raises(DirectionError, match="harm_subspace needs an orthonormal basis"):
        LoraAnchor(model, full, anchor="harm_subspace")


def test_anchor_none_without_terms_adds_nothing(tiny_world, tiny_direction):
    """anchor none with both sign weights 0 (AsFTModule refuses it when lam > 0): zero penalty, zero gradients."""
    model = _peft_model(tiny_world["aligned"], dtype=torch.float32)
    anchor = LoraAnchor(model, load_direction(tiny_direction).modules, anchor="none")
    anchor.start(with_grad=True)
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    record = anchor.stop()
    assert float(record.total_penalty().detach()) == 0.0
    (logits.sum() * 0 + record.total_penalty()).backward()
    assert all(not p.grad.any() for n, p in model.named_parameters() if p.requires_grad)
    assert float(record.drift_ratio()) > 0  # the statistics still use the file's C
