"""Whole, engine-free LoRA factors for work outside DeepSpeed's training step (restoration under ZeRO-1/2/3).

Under DeepSpeed the trainable LoRA factors are owned by the ZeRO engine: the optimizer keeps the float32 master
copies (partitioned from stage 1 on), and under ZeRO-3 the model's own tensors are empty partitions that hooks on
every submodule gather for a forward and release right after it. Functional passes over the LoRA factors
(``torch.func.functional_call``, in-place perturbations for finite differences) cannot work on such tensors.

:func:`standalone_lora` swaps every PEFT ``lora_A`` / ``lora_B`` linear layer for a plain ``nn.Linear`` holding the
factor's whole float32 master value (gathered from the optimizer's partitions), with no DeepSpeed hooks. The frozen
base layers stay with ZeRO (gathered for each forward as usual, so memory stays that of a ZeRO forward plus the
small LoRA factors). On a normal exit the new values are written back everywhere the engine keeps them: the model's
(low-precision) parameters, re-partitioned from rank 0 under ZeRO-3, and the optimizer's float32 masters, so
training, checkpoints and the saved adapter all see them. On an exception nothing is written back.

Every rank must enter and leave the context together (gathering and writing back are collectives), and every rank
must compute the same new values (e.g. from all-reduced gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from asft_lightning.errors import ArgumentError

__all__ = ["lora_factor_layers", "standalone_lora"]


def lora_factor_layers(model: nn.Module) -> dict[str, tuple[nn.ModuleDict, str, nn.Module]]:
    """The trainable PEFT LoRA factor layers: ``{name: (parent ModuleDict, adapter key, layer)}``.

    Raises:
        ValueError: When a trainable parameter lives outside a ``lora_A`` / ``lora_B`` linear layer (DoRA magnitudes,
            embedding LoRA, ``modules_to_save``), which :func:`standalone_lora` does not handle, or when the model has
            no trainable LoRA factor at all.
    """
    layers: dict[str, tuple[nn.ModuleDict, str, nn.Module]] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B") or not isinstance(module, nn.ModuleDict):
            continue
        for key, layer in module.items():
            if isinstance(layer, nn.Linear) and any(p.requires_grad for p in layer.parameters(recurse=False)):
                layers[f"{name}.{key}"] = (module, key, layer)
    covered = {f"{name}.{pname}" for name, (_, _, layer) in layers.items() for pname, _ in layer.named_parameters()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
    if others:
        raise ArgumentError(
            f"standalone_lora: trainable parameters outside LoRA linear factors are not supported under DeepSpeed: "
            f"{others[:3]}{' ...' if len(others) > 3 else ''} (DoRA, embedding LoRA and modules_to_save are not)"
        )
    if not layers:
        raise ArgumentError("standalone_lora: the model has no trainable PEFT lora_A / lora_B linear layer")
    return layers


def _master_value(param: nn.Parameter) -> Tensor:
    """The parameter's whole float32 master value (a collective under ZeRO), or its own data without one."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = None
    if hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping"):
        value = safe_get_full_fp32_param(param)
    if value is None:
        if hasattr(param, "ds_id"):  # ZeRO-3 without an optimizer (validate / test): gather the model's values
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                return param.data.detach().float().clone()
        return param.data.detach().float().clone()
    shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
    return value.detach().float().reshape(shape).clone()


def _write_back(params: list[nn.Parameter], values: list[Tensor]) -> None:
    """Write whole values into the model's parameters and the optimizer's float32 masters."""
    from deepspeed.utils import safe_set_full_fp32_param

    zero3 = [p for p in params if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        # rank 0's values are broadcast and re-partitioned on exit (all ranks computed the same values)
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):
            for p, v in zip(params, values, strict=True):
                if hasattr(p, "ds_id"):
                    p.data.copy_(v.reshape(p.data.shape).to(p.dtype))
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            if not hasattr(p, "ds_id"):
                p.data.copy_(v.to(p.dtype))
            if hasattr(p, "_z3_optimizer") or hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, v.to(torch.float32))


@contextmanager
def standalone_lora(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Within the context, the model's LoRA factors are plain float32 ``nn.Linear`` layers without DeepSpeed hooks.

    Args:
        model: a PEFT model under a DeepSpeed engine (any ZeRO stage); also works on a plain model (then only the
            dtype changes to float32 for the duration, and the values are copied back).

    Yields:
        ``{parameter name: plain parameter}`` of the swapped-in factors (the names are the model's own), for code that
        updates them in place.

    Raises:
        ValueError: See :func:`lora_factor_layers`.
    """
    layers = lora_factor_layers(model)
    originals: list[tuple[nn.ModuleDict, str, nn.Module]] = []
    real: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    try:
        for _, (parent, key, layer) in layers.items():
            weight = _master_value(layer.weight)
            bias = _master_value(layer.bias) if layer.bias is not None else None
            new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device,
                            dtype=torch.float32)  # fmt: skip
            with torch.no_grad():
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
            originals.append((parent, key, layer))
            parent[key] = new
            real.append(layer.weight)
            plain.append(new.weight)
            if bias is not None:
                real.append(layer.bias)
                plain.append(new.bias)
        ids = {id(p) for p in plain}
        yield {n: p for n, p in model.named_parameters() if id(p) in ids}
    except BaseException:
        for parent, key, layer in originals:
            parent[key] = layer
        raise
    for parent, key, layer in originals:
        parent[key] = layer
    _write_back(real, [p.detach() for p in plain])
