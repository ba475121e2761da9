"""Mixed precision: what runs in bf16, what stays in fp32, and why.

Training in bf16 means autocast: the model's weights, their gradients and AdamW's moments
stay fp32 ("master weights"), and inside `autocast_context` every matrix multiply casts its
operands to bf16 and runs at bf16 speed. Everything numerically delicate stays fp32 on
purpose (RMSNorm, RoPE, log_softmax: see model.py and packing.py). fp16 is not offered: its
5-bit exponent overflows without loss scaling.

A frozen model (DPO's reference) has no gradients and no optimizer state, so it does not need
fp32 master weights — but only the tensors that autocast casts to bf16 anyway can be stored in
bf16 without changing a single result: the weights of nn.Linear layers. `hold_frozen_in_bf16`
stores those in bf16 and leaves embeddings, norms and biases in fp32, so a reference run
under the same autocast computes the same numbers as an fp32 copy, with about half the
memory (DPO's loss is ln 2 at the first step, exactly as before).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

DTYPES = ("fp32", "bf16")


def autocast_context(dtype: str, device: torch.device):
    """bf16: matmuls in bf16 under torch.autocast; fp32: no change. Reusable across steps."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


@torch.no_grad()
def hold_frozen_in_bf16(model: nn.Module) -> nn.Module:
    """Store every nn.Linear weight of a frozen model in bf16, the dtype autocast would cast it
    to for each matmul; a weight shared with an embedding (tied lm_head) stays fp32, since the
    embedding lookup is not autocast. Returns the model, frozen (requires_grad False)."""
    model.requires_grad_(False)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in embeddings:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    return model


def default_dtype(device: torch.device) -> str:
    """--dtype auto: bf16 on a GPU that supports it (fp32 there would run with TF32 off and
    SDPA's slowest kernels), fp32 on CPU (where bf16 matmuls are rarely faster)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


__all__ = ["DTYPES", "autocast_context", "hold_frozen_in_bf16", "default_dtype"]
