"""A Qwen-style decoder-only transformer, written out in one file.

Covers the three Hugging Face families that share this skeleton:
  qwen2 / qwen2.5  q/k/v projections with bias, grouped-query attention (GQA)
  qwen3            per-head RMSNorm on q and k before RoPE, explicit head_dim, no bias
  llama            no bias unless `attention_bias` (SmolLM2, TinyLlama)
Each block is   x = x + Attn(RMSNorm(x));   x = x + MLP(RMSNorm(x))   (pre-norm),
the MLP is SwiGLU, positions enter through rotary embeddings (rotate-half RoPE).

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so
loading a checkpoint is a strict key-and-shape check (see checkpoint.py).

Shape legend: B batch, T time (new tokens), S time of keys (past + new),
C hidden size, H query heads, K key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
# The classification architecture name Hugging Face uses for each family's reward model.
REWARD_ARCHITECTURES = {
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
}
CAUSAL_LM_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


@dataclass
class ModelConfig:
    """Hyperparameters, read only from a checkpoint's config.json (never from its folder name)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (always on for qwen2)
    o_bias: bool = False  # bias on the output projection (llama/qwen3 `attention_bias`)
    qk_norm: bool = False  # qwen3: RMSNorm over D on each query and key head
    initializer_range: float = 0.02
    is_reward_model: bool = False
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the original config.json, re-saved as is

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Validate a Hugging Face config dict; refuse what this file does not implement."""

        def need(key):
            if key not in d:
                raise ValueError(f"{source}: missing required key '{key}'")
            return d[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type '{model_type}' is not implemented "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        # Newer configs nest RoPE settings under `rope_parameters`; older ones use
        # `rope_theta` and `rope_scaling`. Only plain (unscaled) RoPE is implemented.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else rope.get("rope_type")
        if rope_type not in (None, "default"):
            key = "rope_scaling" if scaling else "rope_parameters.rope_type"
            raise ValueError(f"{source}: '{key}' = {scaling or rope} is not implemented (only plain RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: 'use_sliding_window': true is not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: 'hidden_act' = {d['hidden_act']!r} is not implemented (only silu)")
        if d.get("mlp_bias"):
            raise ValueError(f"{source}: 'mlp_bias': true is not implemented")
        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads {kv_heads}")
        hidden = need("hidden_size")
        attention_bias = bool(d.get("attention_bias", False))
        architectures = d.get("architectures") or []
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 hard-codes bias on q/k/v and none on o; llama/qwen3 use one switch for all four.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type == "qwen3",
            initializer_range=d.get("initializer_range", 0.02),
            is_reward_model=any(a.endswith("ForSequenceClassification") for a in architectures),
            pad_token_id=d.get("pad_token_id"),
            raw=dict(d),
        )

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """The config.json to write next to the weights (the original keys, updated)."""
        d = dict(self.raw)
        d.update(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if "rope_parameters" not in d:
            d["rope_theta"] = self.rope_theta
        if self.model_type != "qwen2":
            d["attention_bias"] = self.o_bias
        if self.is_reward_model:
            d["architectures"] = [REWARD_ARCHITECTURES[self.model_type]]
            d["num_labels"] = 1
            d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
            d["pad_token_id"] = self.pad_token_id
        else:
            d["architectures"] = [CAUSAL_LM_ARCHITECTURES[self.model_type]]
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (bf16 loses the small variances) then cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        # mean(x^2) = ||x||^2 / C: vector_norm reads x once, where pow then mean take two passes.
        mean_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # (..., 1)
        x = x * torch.rsqrt(mean_sq + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos and signed sin of the rotary angles, (B, T, D) each in fp32: position p rotates the
    pair (i, i + D/2) by the angle p * theta^(-2i/D).

    The sin comes with its first half negated ([-sin, sin]), ready for apply_rope's roll.
    fp32 on purpose: in bf16, positions above a few hundred lose their low bits and the angles drift.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B, T, D) each


def apply_rope(x, cos, signed_sin):
    """Rotate-half RoPE (Su et al. 2021, eq. 34 in the half-split layout) on x (B, nh, T, D), in fp32:
    x * cos + rotate_half(x) * sin, where rotate_half([x1, x2]) = [-x2, x1].

    rotate_half(x) * sin = roll(x, D/2) * [-sin, sin]: one roll replaces split, negate and concatenate,
    and addcmul fuses the multiply-add. Fewer passes over q and k (elementwise passes are a
    visible share of a CPU training step).
    """
    dtype = x.dtype
    x = x.float()
    cos, signed_sin = cos[:, None], signed_sin[:, None]  # (B, 1, T, D) broadcast over heads
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin).to(dtype)


class KVCache:
    """Preallocated keys and values for incremental decoding: per layer (B, K, max_len, D)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # positions filled so far; advanced by the model after all layers ran

    def update(self, layer: int, k, v):
        """Write the new (B, K, T, D) keys/values after the filled part; return all (B, K, S, D)."""
        T = k.shape[2]
        self.k[layer][:, :, self.length : self.length + T] = k
        self.v[layer][:, :, self.length : self.length + T] = v
        return self.k[layer][:, :, : self.length + T], self.v[layer][:, :, : self.length + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, HD, KD = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(C, HD, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, KD, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, KD, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(HD, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0, at=None):
        """x (B, T, C) -> (B, T, C); with `at` (B,), only the query at position at[b] of each row
        is computed, against the keys and values of every position: -> (B, 1, C)."""
        B, T, _ = x.shape
        xq = x if at is None else x[torch.arange(B, device=x.device), at][:, None]  # (B, Tq, C)
        q = self.q_proj(xq).view(B, xq.shape[1], self.n_head, self.head_dim)  # (B, Tq, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, D)
        k = apply_rope(k, cos, sin)
        if at is None:
            q = apply_rope(q, cos, sin)
        else:  # the query's own rotary phase, and the keys that position may see
            rows = torch.arange(B, device=x.device)
            q = apply_rope(q, cos[rows, at][:, None], sin[rows, at][:, None])
            mask = query_mask_at(mask, at, T + (kv_cache.length if kv_cache is not None else 0))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, K, S, D)
        # mask is None: plain causal attention (no padding that a real query could see).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, H, Tq, D)
        y = y.transpose(1, 2).reshape(B, q.shape[2], self.n_head * self.head_dim)  # (B, Tq, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, layer=0, at=None):
        h = self.input_layernorm(x)
        if at is not None:  # only position at[b] of each row is read: keep the residual stream there
            x = x[torch.arange(x.shape[0], device=x.device), at][:, None]  # (B, 1, C)
        x = x + self.self_attn(h, cos, sin, mask, kv_cache, layer, at)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, T: int, past: int):
    """Boolean (B, 1, T, S) mask: key s is visible to query t if s is real and s <= past + t.

    Returns None when plain causal attention is exact, so SDPA can take its fused causal path:
    that holds when there is no cache and padding is only on the right, because a real
    query never looks right of itself. Queries at padding positions would otherwise see
    no key at all (a row of -inf, NaN after softmax), so each query always sees itself;
    their outputs are unused either way.
    """
    if attention_mask is None:
        return None
    m = attention_mask.bool()  # (B, S)
    if past == 0 and bool((m[:, :-1] >= m[:, 1:]).all()):  # right-padded (or unpadded)
        return None
    S = m.shape[1]
    q_pos = torch.arange(past, past + T, device=m.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=m.device)[None, :]  # (1, S)
    visible = (k_pos <= q_pos) & m[:, None, :]  # (B, T, S)
    visible |= k_pos == q_pos  # each query sees itself
    return visible[:, None]  # (B, 1, T, S)


def query_mask_at(mask, at, S: int):
    """Boolean (B, 1, 1, S): the keys visible to one query per row, the one at position at[b].

    mask is attention_mask_4d's (B, 1, T, S) mask, or None for plain causal attention (keys up
    to the query's own position)."""
    if mask is None:
        return (torch.arange(S, device=at.device)[None, :] <= at[:, None])[:, None, None]
    return mask[torch.arange(at.shape[0], device=at.device), :, at][:, :, None]  # (B, 1, S) -> (B, 1, 1, S)


def positions_from_mask(attention_mask, T: int):
    """Position of each of the last T tokens = number of real tokens before it, so left padding
    does not shift the rotary phases: (B, S) mask -> (B, T) positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


class Backbone(nn.Module):
    """Embedding, the decoder stack and the final norm: token ids (B, T) -> hidden (B, T, C)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None, read_at=None):
        """read_at (B,): when the caller reads one position per row (a reward model reads the last
        real token), the last layer computes its queries, attention output and MLP only there
        (its keys and values still come from every position) and the result is (B, C). Exact:
        no other position of the last layer reaches that output."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        positions = positions_from_mask(attention_mask, T)  # (B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # (B, T, D) each
        mask = attention_mask_4d(attention_mask, T, past)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            at = read_at if i == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its activations during backward.
                x = checkpoint(layer, x, cos, sin, mask, None, i, at, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache, i, at)
        if kv_cache is not None:
            kv_cache.length += T
        if read_at is not None and not self.layers:  # no layer to narrow: pick the positions here
            x = x[torch.arange(B, device=x.device), read_at][:, None]
        x = self.norm(x)  # (B, T, C), or (B, 1, C) with read_at
        return x if read_at is None else x[:, 0]


class _GradientCheckpointingSwitch:
    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        self.model.gradient_checkpointing = bool(on)


class CausalLM(_GradientCheckpointingSwitch, nn.Module):
    """Backbone + vocabulary projection: (B, T) ids -> (B, T, V) next-token logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        init_weights(self, cfg.initializer_range)

    def hidden_states(self, input_ids, attention_mask=None, kv_cache=None):
        """(B, T) -> (B, T, C) after the final norm; training projects only labelled positions."""
        return self.model(input_ids, attention_mask, kv_cache)

    def forward(self, input_ids, attention_mask=None, kv_cache=None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, kv_cache))  # (B, T, V)


def last_token_index(attention_mask):
    """Index of each row's last real token, (B, T) -> (B,), for right and left padding alike."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(1).argmax(1)


class RewardModel(_GradientCheckpointingSwitch, nn.Module):
    """Backbone + scalar head: the reward of a sequence is score(h) at its last real token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = replace(cfg, is_reward_model=True)
        self.config = cfg
        self.model = Backbone(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None):
        """(B, T) ids -> (B,) fp32 rewards."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = last_token_index(attention_mask)  # (B,)
        h_last = self.model(input_ids, attention_mask, read_at=last)  # (B, C), the last layer run only there
        return self.score(h_last).squeeze(-1).float()  # (B,)


@torch.no_grad()
def init_weights(module: nn.Module, std: float):
    """Normal(0, std) for matrices and embeddings, zeros for biases, ones for norms (as HF does).

    Skipped on the meta device, where loading assigns real tensors afterwards."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
            m.weight.normal_(0.0, std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ModelConfig", "CausalLM", "RewardModel", "KVCache", "RMSNorm", "last_token_index",
    "num_parameters",
]
