"""Full copies of a model's weights, and putting them back, under every engine a TRL trainer runs in: one process,
DDP, and DeepSpeed ZeRO-1/2/3. Used by the collapse guard to keep and restore its best probe step.

- plain / DDP: the parameters are whole on every rank and are what the optimizer updates.
- DeepSpeed ZeRO-1/2: the parameters are whole on every rank, but the optimizer updates its own fp32 master copy,
  partitioned over ranks, and copies it back after each step: both must be set, or the next step undoes a restore.
- DeepSpeed ZeRO-3: the parameters themselves are partitioned (``model.state_dict()`` holds empty shards); they are
  gathered to copy them and set through DeepSpeed's gathered-parameter context to restore them.

The fp32 values come from DeepSpeed's public accessors (``deepspeed.utils.safe_get_full_fp32_param`` and
``safe_set_full_fp32_param``), which every rank calls together. FSDP is not supported (accelerate 1.15 never enables it
on CPU, so it is untested here): :func:`weights_engine` names it so that callers refuse it up front.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

__all__ = ["weights_engine", "snapshot_weights", "restore_weights", "reset_optimizer_state"]


def weights_engine(model: torch.nn.Module, args: Any = None) -> str:
    """``"deepspeed_zero3"``, ``"deepspeed"`` (ZeRO-1/2), ``"fsdp"`` or ``"plain"`` (one process or DDP), read from
    the parameters (DeepSpeed marks them) and from the training arguments (FSDP)."""
    if args is not None and getattr(args, "fsdp", None):
        return "fsdp"
    parameters = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):
        return "deepspeed_zero3"
    if any(getattr(p, "_hp_mapping", None) is not None for p in parameters):
        return "deepspeed"
    return "plain"


def _gathered(parameters: list[torch.nn.Parameter], engine: str, modifier_rank: int | None = None):
    """ZeRO-3: the full values of ``parameters`` inside the context (``modifier_rank``'s changes kept on exit)."""
    if engine != "deepspeed_zero3":
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


@torch.no_grad()
def snapshot_weights(model: torch.nn.Module, engine: str) -> dict[str, torch.Tensor]:
    """A full CPU copy of every parameter (by ``named_parameters`` name) and buffer (by ``named_buffers`` name).
    Under DeepSpeed the parameters' fp32 master values are copied (every rank must call this together)."""
    copy: dict[str, torch.Tensor] = {}
    if engine.startswith("deepspeed"):
        from deepspeed.utils import safe_get_full_fp32_param

        for name, parameter in model.named_parameters():
            full = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
            if full is None:  # frozen (e.g. a LoRA base weight): no master copy, its (gathered) value is the weight
                with _gathered([parameter], engine):
                    copy[name] = parameter.detach().to("cpu", copy=True)
                continue
            copy[name] = full.detach().to("cpu", torch.float32, copy=True)
    else:
        for name, parameter in model.named_parameters():
            copy[name] = parameter.detach().to("cpu", copy=True)
    for name, buffer in model.named_buffers():
        copy[name] = buffer.detach().to("cpu", copy=True)
    return copy


@torch.no_grad()
def restore_weights(model: torch.nn.Module, engine: str, weights: dict[str, torch.Tensor]) -> None:
    """Put ``weights`` (from :func:`snapshot_weights`) back into the model, and under DeepSpeed into the optimizer's
    fp32 master copy too, so that the next optimizer step starts from them. Every rank calls this together, with the
    same ``weights``."""
    parameters = dict(model.named_parameters())
    missing = sorted(set(parameters) - set(weights))
    if missing:
        raise ValueError(f"The saved weights lack {len(missing)} parameters of the model, e.g. {missing[:3]}.")
    if engine.startswith("deepspeed"):
        from deepspeed.utils import safe_set_full_fp32_param

        for name, parameter in parameters.items():
            if parameter.requires_grad:
                safe_set_full_fp32_param(parameter, weights[name].to(parameter.device))
    # The working (low-precision) parameters; under ZeRO-3 gathered, set on rank 0 and re-partitioned to all.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with _gathered(list(parameters.values()), engine, modifier_rank=0):
        if engine != "deepspeed_zero3" or rank == 0:
            for name, parameter in parameters.items():
                parameter.data.copy_(weights[name].to(parameter.device, parameter.dtype))
    for name, buffer in model.named_buffers():
        if name in weights:
            buffer.copy_(weights[name].to(buffer.device, buffer.dtype))


def reset_optimizer_state(optimizer: Any) -> int:
    """Zero every state tensor (Adam's moments, its step count) of ``optimizer`` and of the optimizers it wraps
    (accelerate's and DeepSpeed's wrappers keep the torch optimizer in ``.optimizer``), in place, so that the next step
    is a fresh optimizer's first step; returns how many tensors were zeroed."""
    zeroed, seen = 0, set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        state = getattr(optimizer, "state", None)
        if isinstance(optimizer, torch.optim.Optimizer) and isinstance(state, dict):
            for per_param in state.values():
                for key, value in per_param.items():
                    if torch.is_tensor(value):
                        value.zero_()
                        zeroed += 1
                    elif isinstance(value, int | float) and not isinstance(value, bool):
                        per_param[key] = type(value)(0)
        optimizer = getattr(optimizer, "optimizer", None)
    return zeroed
