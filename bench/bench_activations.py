"""Activation bytes per token per decoder layer at the real Qwen2.5 widths, measured on the CPU.

    python bench/bench_activations.py            # about a minute; needs ~3 GB of free memory

What autograd keeps from a layer's forward for its backward, found with saved_tensors_hooks: every
saved tensor's storage once, minus the parameters and the weight copies autocast makes (those are
in docs/memory.md's 16 N + 2 M), divided by the tokens. One decoder layer (weights uninitialised: sizes do
not depend on values) on 1 row of T tokens, causal attention (SDPA's flash kernel, which saves its
output and one log-sum-exp per query and head, as the CUDA kernels do), in two precisions:

    autocast bf16   fp32 weights and residual stream, matmuls in bf16 (replicated data parallel)
    bf16            bf16 weights and residual stream (FSDP2's MixedPrecisionPolicy)

With --gradient_checkpointing a layer keeps only its input (C x 4 bytes per token under autocast,
C x 2 in bf16) and recomputes the rest in backward, one layer at a time. Not counted here: the
packed mask (B x T x T x 2 bytes, once per forward), the logits of the labelled positions
(N x V x 4 bytes while the loss is computed), and the reference's forward (no graph, transient).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minialign.config import ModelConfig  # noqa: E402
from minialign.model import DecoderLayer, rope_cos_sin  # noqa: E402

WIDTHS = {  # hidden, intermediate, query heads, key/value heads (each config.json of Qwen2.5)
    "0.5B": (896, 4864, 14, 2), "1.5B": (1536, 8960, 12, 2), "3B": (2048, 11008, 16, 2),
    "7B": (3584, 18944, 28, 4), "14B": (5120, 13824, 40, 8), "32B": (5120, 27648, 40, 8),
}


def saved_bytes_per_token(name: str, precision: str, T: int) -> float:
    """Bytes autograd saves for one layer's backward, per token (parameters and weight casts excluded)."""
    C, inter, H, K = WIDTHS[name]
    cfg = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=16, hidden_size=C, intermediate_size=inter,
                                        num_attention_heads=H, num_key_value_heads=K, num_hidden_layers=1))
    dtype = torch.float32 if precision == "autocast bf16" else torch.bfloat16
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    layer = layer.to_empty(device="cpu").to(dtype)
    # A matmul saves its weight transposed: a parameter, or autocast's bf16 copy of one (same shapes).
    weight_shapes = {s for p in layer.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    # The layer's input counts: it is the residual stream the previous layer wrote, saved here once.
    x = torch.randn(1, T, C, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T)[None], cfg.head_dim, cfg.rope_theta)
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and tuple(t.shape) not in weight_shapes:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast bf16"):
        layer(x, cos=cos, sin=sin, mask=None)
    return sum(storages.values()) / T


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="tokens of the row (no dimension of a weight)")
    p.add_argument("--sizes", default="0.5B,7B,32B")
    args = p.parse_args(argv)
    print(f"{'Qwen2.5':8} {'precision':14} {'saved KB / token / layer':>25} {'with checkpointing':>19}")
    for name in args.sizes.split(","):
        for precision in ("autocast bf16", "bf16"):
            per_token = saved_bytes_per_token(name, precision, args.tokens)
            kept = WIDTHS[name][0] * (4 if precision == "autocast bf16" else 2)  # the layer's input only
            print(f"{name:8} {precision:14} {per_token / 1e3:25.1f} {kept / 1e3:19.1f}", flush=True)


if __name__ == "__main__":
    main()
