"""Attach the AsFT penalty to PEFT LoRA layers, computed inside each layer's forward.

Why inside the forward: under DeepSpeed ZeRO-3 a LoRA factor is only whole (gathered) while its layer runs.
A penalty computed later, in ``training_step``, would read partitioned (empty) tensors. So each targeted
``peft.tuners.lora.LoraLayer`` gets a forward hook (prepended, so it runs before any engine hook that frees
parameters) which

1. computes the module's penalty value *and* its gradients w.r.t. ``lora_A``/``lora_B`` on detached copies
   (a tiny graph: ``O(d_out d_in r)`` with the full direction, ``O(d_out k r)`` low rank);
2. threads the layer output through :class:`_PenaltyCarrier`, an autograd function that returns the output
   unchanged plus the penalty value, and whose backward hands ``dL/dvalue * grad`` to ``lora_A``/``lora_B``.

The carrier's backward runs when the layer's own backward does (it waits for the output's gradient), i.e.
when an engine has the layer's parameters gathered, and the incoming ``dL/dvalue`` already carries
``lambda``, gradient-accumulation division and any loss scaling. Without sharding this is exactly
``autograd`` of ``lambda * sum_l penalty_l``, which the tests check in float64.

Which penalty: the anchor term of :mod:`asft_lightning.anchor_forms` (``projector``, ``normalized``,
``harm_subspace``, ``none``) plus the optional whole-``V`` and per-component sign terms. Every term is a function
of one module's ``(direction, lora_A, lora_B)``, so all of them go through the same hook and carrier, and so all
of them are correct under ZeRO-3 in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from asft_lightning.anchor_forms import anchor_penalty, check_forms
from asft_lightning.direction import ModuleDirection
from asft_lightning.regularizers import component_sign_penalty, sign_aware_penalty, update_energy

PenaltyFn = Callable[[ModuleDirection, Tensor, Tensor], Tensor]
PEFT_PREFIX = "base_model.model."


def default_penalty(md: ModuleDirection, lora_A: Tensor, lora_B: Tensor) -> Tensor:
    """``||(I - C) B A||_F^2`` with the module's stored projector."""
    return md.penalty(lora_A, lora_B)


def _identity(t: Tensor) -> Tensor:
    return t


class _PenaltyCarrier(torch.autograd.Function):
    """Identity on the layer output; a second output carries the penalty value with precomputed gradients."""

    @staticmethod
    def forward(ctx, output, lora_A, lora_B, value, grad_A, grad_B):  # noqa: D417
        # kept as plain attributes, not save_for_backward: they are constants of this step, and saved tensors would be
        # packed by activation checkpointing, whose recomputation (no penalty recorded) would then save fewer tensors
        ctx.grads = (grad_A, grad_B)
        return output.view_as(output), value.clone()

    @staticmethod
    def backward(ctx, grad_output, grad_value):
        grad_A, grad_B = ctx.grads
        return grad_output, grad_value * grad_A, grad_value * grad_B, None, None, None


@dataclass
class StepRecord:
    """Per-module penalty values (attached to the graph when gradients flow) and detached statistics."""

    penalties: dict[str, Tensor] = field(default_factory=dict)
    energies: dict[str, Tensor] = field(default_factory=dict)
    residuals: dict[str, Tensor] = field(default_factory=dict)

    def total_penalty(self) -> Tensor | None:
        """Sum of the module penalties (``None`` when nothing ran)."""
        return torch.stack(list(self.penalties.values())).sum() if self.penalties else None

    def drift_ratio(self) -> Tensor | None:
        """``sqrt(sum_l ||(I - C_l) dW_l||^2 / sum_l ||dW_l||^2)`` over all modules (``0`` for a zero update)."""
        if not self.energies:
            return None
        energy = torch.stack(list(self.energies.values())).sum()
        residual = torch.stack(list(self.residuals.values())).sum()
        return torch.where(energy > 0, (residual.clamp_min(0) / energy.clamp_min(1e-30)).sqrt(), energy * 0)

    def module_drift(self) -> dict[str, float]:
        """Per-module drift ratio ``||(I - C) dW||_F / ||dW||_F``."""
        out = {}
        for name, e in self.energies.items():
            e = float(e)
            out[name] = (max(float(self.residuals[name]), 0.0) / e) ** 0.5 if e > 0 else 0.0
        return out


class LoraAnchor:
    """Computes the AsFT penalty of every targeted LoRA layer of a PEFT model inside its forward.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module tree containing PEFT ``LoraLayer`` modules).
        directions: per base-model module name, its :class:`ModuleDirection`.
        include_lora_scale: penalise ``s * B A`` (``s = alpha / r``) instead of ``B A``.
        penalty_fn: the per-module anchor term, ``(direction, lora_A, lora_B) -> scalar``; default: ``anchor``'s.
        sign_weight: weight of this project's sign-aware extension ``relu(-<B A, V>_F / ||V||_F)^2``, added to
            each module's penalty (needs the full ``V``); the drift statistics leave it out.
        anchor: the anchor term (:mod:`asft_lightning.anchor_forms`): ``projector`` ``||(I - C) B A||^2`` (the
            published AsFT), ``normalized`` (``C`` divided by its top eigenvalue), ``harm_subspace``
            (``||U U^T B A||^2`` for a harmful-reference basis), ``inside`` (the same for the alignment direction's
            basis) or ``none``.
        component_weight: weight of the per-component sign term ``sum_i relu(-u_i^T B A v_i)^2`` over the file's
            singular components (needs a low-rank file with right singular vectors); left out of the statistics.
        direction_dtype: dtype the directions are kept in on the device (``None``: the LoRA weights' dtype).
        zero3: the model runs under DeepSpeed ZeRO-3: register each layer's ``lora_A``/``lora_B`` weights as external
            parameters of the layer, so DeepSpeed keeps them gathered through the layer's forward (where the hook
            reads them) and gathers them again for the layer's backward (where the carrier hands them gradients).
            Registering is bookkeeping only, so it may happen before ``deepspeed.initialize`` partitions them.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        directions: dict[str, ModuleDirection],
        include_lora_scale: bool = False,
        penalty_fn: PenaltyFn | None = None,
        sign_weight: float = 0.0,
        direction_dtype: torch.dtype | None = None,
        zero3: bool = False,
        anchor: str = "projector",
        component_weight: float = 0.0,
    ) -> None:
        self.layers = lora_layers(peft_model)
        self.directions = directions
        self.include_lora_scale = include_lora_scale
        self.anchor = anchor
        self.penalty_fn = penalty_fn if penalty_fn is not None else anchor_penalty(anchor)
        self.sign_weight = float(sign_weight)
        self.component_weight = float(component_weight)
        # what the terms compute with must be in the file (the reference is checked by AsFTModule, which has the file)
        check_forms(directions, anchor if penalty_fn is None else "none", self.sign_weight, self.component_weight)
        self.direction_dtype = direction_dtype
        self._placed: dict[str, ModuleDirection] = {}
        self._record: StepRecord | None = None
        self._with_grad = False
        self._handles = self._attach()
        if zero3:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for layer in self.layers.values():
                for factors in (layer.lora_A, layer.lora_B):
                    for linear in factors.values():
                        register_external_parameter(layer, linear.weight)

    def _attach(self) -> list:
        # prepended: the hook must run before any engine's post-forward hook (which may free the LoRA weights)
        return [layer.register_forward_hook(self._make_hook(name), prepend=True) for name, layer in self.layers.items()]

    def remove(self) -> None:
        """Detach all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def start(self, with_grad: bool) -> None:
        """Begin recording one forward pass; ``with_grad`` attaches penalty gradients to the LoRA factors."""
        layers = self.layers.values()
        if self._handles and any(h.id not in layer._forward_hooks for h, layer in zip(self._handles, layers, strict=True)):
            # an engine cleared the module hooks (Lightning's DeepSpeed validate/test setup does): attach them again
            self._handles = self._attach()
        self._record = StepRecord()
        self._with_grad = with_grad

    def stop(self) -> StepRecord:
        """End recording and return what the forward pass produced."""
        record, self._record = self._record or StepRecord(), None
        return record

    def _placed_direction(self, name: str, like: Tensor) -> ModuleDirection:
        md = self._placed.get(name)
        dtype = self.direction_dtype or like.dtype
        probe = md.basis if md is not None and md.basis is not None else (md.direction if md else None)
        if md is None or probe.device != like.device or probe.dtype != dtype:
            md = self.directions[name].to(like.device, dtype)
            self._placed[name] = md
        return md

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args, output):
            record = self._record
            if record is None or name not in self.directions:
                return None
            adapter = module.active_adapters[0]
            weight_A = module.lora_A[adapter].weight
            weight_B = module.lora_B[adapter].weight
            md = self._placed_direction(name, weight_A)
            scale2 = float(module.scaling[adapter]) ** 2 if self.include_lora_scale else 1.0
            track = self._with_grad and torch.is_grad_enabled() and (weight_A.requires_grad or weight_B.requires_grad)
            # the penalty's own small graph lives and dies here: keep it out of activation checkpointing's
            # saved-tensor hooks (a checkpointed layer would otherwise count its tensors, and recompute without them)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                a = weight_A.detach().requires_grad_(track)
                b = weight_B.detach().requires_grad_(track)
                main = self.penalty_fn(md, a, b) if self.penalty_fn is not None else None
                raw = main if main is not None else a.new_zeros(())
                if self.sign_weight:
                    raw = raw + self.sign_weight * sign_aware_penalty(a, b, md.direction)
                if self.component_weight:
                    raw = raw + self.component_weight * component_sign_penalty(a, b, md.basis, md.right)
                if track and raw.requires_grad:
                    grad_a, grad_b = torch.autograd.grad(raw * scale2, (a, b))
                elif track:  # anchor none without sign terms: nothing to hand back
                    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
            raw = raw.detach()
            with torch.no_grad():
                record.energies[name] = update_energy(a.detach(), b.detach())
                # the drift statistics: ||(I - C) dW||^2 with the term's C where it is one (projector, normalized),
                # else with the file's own C
                keep = main is not None and self.anchor in ("projector", "normalized")
                record.residuals[name] = main.detach() if keep else md.penalty(a.detach(), b.detach())
            value = raw * scale2
            if track:
                output, value = _PenaltyCarrier.apply(output, weight_A, weight_B, value, grad_a, grad_b)
            record.penalties[name] = value
            return output

        return hook


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers by base-model module name (``base_model.model.`` stripped)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and len(module.lora_A) > 0:
            out[name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name] = module
    return out


def lora_shapes(layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each LoRA layer's update, read from the factors (ZeRO-3's ``ds_shape`` if partitioned)."""
    shapes = {}
    for name, layer in layers.items():
        adapter = layer.active_adapters[0]
        a = layer.lora_A[adapter].weight
        b = layer.lora_B[adapter].weight
        a_shape = tuple(getattr(a, "ds_shape", a.shape))
        b_shape = tuple(getattr(b, "ds_shape", b.shape))
        shapes[name] = (b_shape[0], a_shape[1])
    return shapes
