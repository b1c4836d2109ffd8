"""The candidate anchors under DeepSpeed ZeRO-3 (2 CPU processes, gloo) equal a single-process reference.

Same setting as ``test_deepspeed.test_zero3_matches_single_process_and_resumes`` (its helpers are imported): the
shipped ZeRO-3 config with activation checkpointing, fp32, LoRA dropout 0, a non-zero starting adapter, the same
global batches. Only the penalty differs: the new terms read ``U_k``, ``V_k`` and ``sigma`` beside ``A`` and ``B``
inside each layer's forward, where ZeRO-3 has the layer's LoRA factors gathered.
"""

from __future__ import annotations

import pytest
import torch
from test_deepspeed import (  # noqa: F401 (start_adapter is a fixture)
    CPU_ZERO3,
    EPOCHS,
    LAM,
    LR,
    MICRO_BATCH,
    N_TRAIN,
    STEPS_PER_EPOCH,
    WORLD,
    _asft,
    _assert_matches_reference,
    _fit_args,
    _lora_weights,
    start_adapter,
)

from asft_lightning.direction import extract_direction


@pytest.fixture(scope="module")
def zero3_files(tiny_world, tmp_path_factory) -> dict[str, str]:
    """float64 files: the published C's top-4 eigenpairs (base reference), and a harmful-reference subspace basis
    taken against a random LoRA adapter on the aligned model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("zero3_forms")
    eig = root / "eigenpairs.safetensors"
    extract_direction(tiny_world["aligned"], tiny_world["unaligned"], str(eig), rank=4, dtype="float64",
                      hash_inputs=False)
    torch.manual_seed(11)
    harm = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_world["aligned"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in harm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    harm.save_pretrained(str(root / "harm_adapter"))
    harmful = root / "harmful.safetensors"
    extract_direction(tiny_world["aligned"], str(root / "harm_adapter"), str(harmful), projector="subspace", rank=4,
                      reference="harmful", dtype="float64", hash_inputs=False)
    return {"eigenpairs": str(eig), "harmful": str(harmful)}


def _reference(world, direction, adapter, form: dict):
    """Single process, no Lightning, no DeepSpeed (as ``test_deepspeed._train_reference``, with the form's settings):
    per-step losses, the penalties, the final LoRA weights."""
    from torch.utils.data import DistributedSampler

    from asft_lightning.data import AsFTDataModule, collate
    from asft_lightning.module import AsFTModule

    data = AsFTDataModule(
        tokenizer=world["aligned"], task_data=world["task"], harmful_data=world["harmful"], n=N_TRAIN,
        harmful_ratio=0.5, val_size=0, max_length=64, batch_size=MICRO_BATCH, seed=42,
    )  # fmt: skip
    data.setup("fit")
    module = AsFTModule(model=world["aligned"], direction=direction, lam=LAM, adapter=adapter, learning_rate=LR, **form)
    module.configure_model()
    optimizer = module.configure_optimizers()
    losses, penalties = [], []
    for epoch in range(EPOCHS):
        orders = []
        for rank in range(WORLD):
            sampler = DistributedSampler(data.train_dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=42)
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
        for step in range(STEPS_PER_EPOCH):
            total = 0.0
            for order in orders:
                idx = order[step * MICRO_BATCH : (step + 1) * MICRO_BATCH]
                out = module._step(collate([data.train_dataset[i] for i in idx], data.pad_token_id), with_grad=True)
                total = total + out["loss"]
            loss = total / WORLD
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            penalties.append(float(out["penalty"]))
    return losses, penalties, _lora_weights(module)


@pytest.mark.slow
@pytest.mark.parametrize(
    "file,form",
    [
        ("eigenpairs", {"anchor": "normalized", "component_weight": 200.0}),
        ("harmful", {"anchor": "harm_subspace", "component_weight": 200.0}),
    ],
    ids=["normalized+components", "harm_subspace+components"],
)
def test_zero3_anchor_forms_match_single_process(tiny_world, zero3_files, start_adapter, tmp_path, file, form):  # noqa: F811
    direction = zero3_files[file]
    losses, penalties, weights = _reference(tiny_world, direction, start_adapter, form)
    # the penalty is a visible part of the loss, so a wrong or missing penalty gradient cannot hide in the tolerance
    assert LAM * penalties[0] > 0.05 * losses[0], (penalties, losses)
    flags = [f"--model.{k}={v}" for k, v in form.items()]
    out = tmp_path / "zero3"
    _asft(_fit_args(tiny_world, direction, start_adapter, out, CPU_ZERO3, flags), tmp_path)
    _assert_matches_reference(out, (losses, weights), rtol_loss=1e-5, atol_w=1e-6)
