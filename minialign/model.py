"""A Qwen-style decoder-only transformer, written out in one file.

Covers the three Hugging Face families that share this skeleton:
  qwen2 / qwen2.5  q/k/v projections with bias, grouped-query attention (GQA)
  qwen3            per-head RMSNorm on q and k before RoPE, explicit head_dim, no bias
  llama            no bias unless `attention_bias` (SmolLM2, TinyLlama, Llama 3.x: RoPE scaling)
Each block is   x = x + Attn(RMSNorm(x));   x = x + MLP(RMSNorm(x))   (pre-norm),
the MLP is SwiGLU, positions enter through rotary embeddings (rotate-half RoPE).

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`), so
loading a checkpoint is a strict key-and-shape check (see checkpoint.py); the
hyperparameters come from config.json through config.ModelConfig.

Shape legend: B batch, T time (new tokens), S time of keys (past + new),
C hidden size, H query heads, K key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, RopeScaling


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


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None, device=None):
    """(D/2,) fp32 rotary frequencies f_i = theta^(-2i/D), scaled as config.json asks:

      linear (position interpolation, Chen et al. 2023): position p is read as p / factor, the
        same angles as every f_i / factor.
      llama3 (Meta's Llama 3.1 reference code, `apply_scaling` in meta-llama/llama-models; the same
        rule as transformers' `_compute_llama3_parameters`): with wavelength w = 2 pi / f and
        L = original_max_position_embeddings,
          w < L / high_freq_factor   f unchanged          (fast-turning pairs: local word order)
          w > L / low_freq_factor    f / factor           (slow pairs, stretched to the longer context)
          otherwise                  (1 - s) f / factor + s f,  s = (L / w - low_freq_factor)
                                                                   / (high_freq_factor - low_freq_factor)
        s runs from 0 to 1 across the middle band, so the three pieces meet without a jump.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    L, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    s = (L / wavelength - low) / (high - low)
    smoothed = (1 - s) * inv_freq / scaling.factor + s * inv_freq
    scaled = torch.where(wavelength > L / low, inv_freq / scaling.factor, smoothed)
    return torch.where(wavelength < L / high, inv_freq, scaled)


def rope_cos_sin(positions, head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """cos and signed sin of the rotary angles, (B, T, D) each in fp32: position p rotates the
    pair (i, i + D/2) by the angle p * f_i, f_i = theta^(-2i/D) (or scaled: rope_inverse_frequencies).

    The sin comes with its first half negated ([-sin, sin]), ready for apply_rope's roll.
    fp32 on purpose: in bf16, positions above a few hundred lose their low bits and the angles drift.
    """
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, positions.device)  # (D/2,)
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
        xq = x if at is None else take_positions(x, at)  # (B, Tq, C)
        q = self.q_proj(xq).view(B, xq.shape[1], self.n_head, self.head_dim)  # (B, Tq, H, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # qwen3 normalises each head before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, D)
        cos_q, sin_q = (cos, sin) if at is None else (take_positions(cos, at), take_positions(sin, at))
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, K, S, D)
        if at is not None:  # the keys that the one query per row may see
            mask = query_mask_at(mask, at, k.shape[2])
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
            x = take_positions(x, at)  # (B, 1, C)
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


def take_positions(x, at):
    """x (B, T, ...) -> (B, 1, ...): position at[b] of each row b, keeping a time axis of one."""
    return x[torch.arange(x.shape[0], device=x.device), at][:, None]


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
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                                self.cfg.rope_scaling)  # (B, T, D) each
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
            x = take_positions(x, read_at)
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
    "CausalLM", "RewardModel", "KVCache", "RMSNorm", "last_token_index",
    "num_parameters",
]
