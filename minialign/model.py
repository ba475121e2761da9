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

Shape legend: B batch, T time (new tokens), S time of keys (past + new), n positions read per
row, C hidden size, H query heads, K key/value heads, D head dim, V vocabulary.
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
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
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
    """cos and sin of the rotary angles, (B, T, D) each in fp32: position p rotates the pair
    (i, i + D/2) by the angle p * f_i, f_i = theta^(-2i/D) (or scaled: rope_inverse_frequencies), so
    both halves of the last dim carry the same angles.

    fp32 on purpose: in bf16, positions above a few hundred lose their low bits and the angles drift.
    """
    inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, positions.device)  # (D/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): the pair (i, i + D/2) shares angle i
    return angles.cos(), angles.sin()


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the two halves of the last dim: each pair (i, i + D/2) turned by 90 degrees."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (Su et al. 2021, eq. 34 in the half-split layout) on x (B, nh, T, D), in fp32:
    each pair (x_i, x_{i+D/2}) rotated by its angle, x * cos + rotate_half(x) * sin."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angles for every head
    return (x * cos + rotate_half(x) * sin).to(dtype)


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


def attend(q, k, v, mask):
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1), softmax(q k^T / sqrt(D)) v, over the
    keys that the mask lets each query see.

    q (B, H, Tq, D); k and v (B, K, S, D), each key/value head shared by H/K query heads (grouped-query
    attention, Ainslie et al. 2023); mask (B, 1, Tq, S) bool, True where the query may see the key, or
    the same as an additive float mask (additive_mask), or None for plain causal attention (Tq = S).
    Returns (B, H, Tq, D).
    """
    groups = q.shape[1] // k.shape[1]
    if mask is not None and q.is_cuda and groups > 1:
        # On CUDA a mask rules out the flash kernel, and the memory-efficient kernel (the one that takes
        # a mask) accepts grouped heads only in recent torch (2.13's docs: "GQA works only for flash and
        # math"). Without this, SDPA would fall silently to the math kernel, which materialises the
        # (B, H, Tq, S) scores in fp32. Repeating each key/value head H/K times keeps it on a fused kernel.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.shape[1] != q.shape[1]
    )


def attend_folded(q, k, v, mask):
    """attend() for decoding from a KV cache, without repeating the cache's keys and values.

    q (B, H, Tq, D); k and v (B, K, S, D), the whole cache so far; mask (B, 1, Tq, S) bool. With
    G = H / K query heads per key/value head, query head h = k * G + g reads key/value head k (the
    repeat_interleave convention of attend and of Hugging Face's repeat_kv). So the G heads of a
    group are folded into the query axis: q viewed as (B, K, G * Tq, D), the mask expanded to
    (B, 1, G * Tq, S), and one plain attention per key/value head. Exact: every query row still
    takes its softmax over the same keys with the same mask; only the copy is gone. Repeating
    instead writes the whole cache H / K times per layer per token (13 GB per token at 7B, B 32,
    S 1024), and SDPA's enable_gqa does the same on its math path. Returns (B, H, Tq, D).
    """
    B, H, Tq, D = q.shape
    K = k.shape[1]
    G = H // K
    if G == 1 or mask is None:  # nothing to fold, or plain causal attention (prefill without padding)
        return attend(q, k, v, mask)
    q = q.reshape(B, K, G * Tq, D)  # (B, H, Tq, D) -> (B, K, G*Tq, D): head k*G+g, query t at row g*Tq+t
    mask = mask.expand(B, G, Tq, mask.shape[-1]).reshape(B, 1, G * Tq, mask.shape[-1])  # the same rows per head
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, K, G*Tq, D)
    return y.reshape(B, H, Tq, D)


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

    def queries(self, x, cos, sin):
        """x (B, T, C) -> rotated queries (B, H, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        if self.qk_norm:  # qwen3 normalises each head before the rotation
            q = self.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, D)

    def keys_values(self, x, cos, sin):
        """x (B, T, C) -> rotated keys and values, (B, K, T, D) each."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            k = self.k_norm(k)
        return apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)  # (B, K, T, D) each

    def forward(self, x, *, cos, sin, mask, kv_cache: KVCache | None = None, layer_index: int = 0):
        """x (B, T, C) -> (B, T, C)."""
        q = self.queries(x, cos, sin)  # (B, H, T, D)
        k, v = self.keys_values(x, cos, sin)  # (B, K, T, D)
        if kv_cache is not None:  # decoding: the cache is read in place, never repeated per query head
            k, v = kv_cache.update(layer_index, k, v)  # (B, K, S, D): the past and the new
            y = attend_folded(q, k, v, mask)  # (B, H, T, D)
        else:
            y = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).flatten(2))  # (B, T, H*D) -> (B, T, C)


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

    def forward(self, x, *, cos, sin, mask, kv_cache: KVCache | None = None, layer_index: int = 0):
        """x (B, T, C) -> (B, T, C)."""
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, cos=cos, sin=sin, mask=mask, kv_cache=kv_cache, layer_index=layer_index)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_at(self, x, *, cos, sin, mask, at):
        """The reward model's shortcut: this layer computed only at positions at (B, n) of each row,
        x (B, T, C) -> (B, n, C), equal to forward(x)[b, at[b]].

        A reward is read at a few positions per row (the last real token; packing.py reads two). In
        the last layer no other position's output reaches them: attention needs the keys and values
        of every position, but the queries, the attention output, o_proj, the MLP and both residual
        additions are needed only at the read positions. Run as the last layer, this skips
        (T - n) / T of that layer's q, o and MLP matmuls and of its attention (at 4 layers about a
        quarter of a step's matmuls). A method of the layer, not a free function, so that a sharded
        layer (fsdp.py) gathers its weights for it as it does for forward."""
        h = self.input_layernorm(x)  # (B, T, C): the keys and values need every position
        attn = self.self_attn
        k, v = attn.keys_values(h, cos, sin)  # (B, K, T, D)
        q = attn.queries(take_positions(h, at), take_positions(cos, at), take_positions(sin, at))  # (B, H, n, D)
        y = attend(q, k, v, mask_rows(mask, at, k.shape[2]))  # (B, H, n, D)
        x = take_positions(x, at) + attn.o_proj(y.transpose(1, 2).flatten(2))  # (B, n, C)
        return x + self.mlp(self.post_attention_layernorm(x))


def take_positions(x, at):
    """x (B, T, ...) -> (B, n, ...): positions at[b] (n of them) of each row b."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], at]


def mask_rows(mask, at, S: int):
    """The rows of a (B, 1, T, S) mask (bool or additive) for the queries at positions at (B, n): (B, 1, n, S).
    mask None stands for plain causal attention: each query sees the keys up to its own position."""
    if mask is None:
        return (torch.arange(S, device=at.device) <= at[..., None])[:, None]  # (B, n, S) -> (B, 1, n, S)
    return take_positions(mask[:, 0], at)[:, None]  # (B, T, S) -> (B, n, S) -> (B, 1, n, S)


def attention_mask_4d(attention_mask, T: int, past: int):
    """Boolean (B, 1, T, S) mask from a (B, S) padding mask: key s is visible to query t if s is real
    and s <= past + t.

    Returns None when plain causal attention is exact, so SDPA can take its fused causal path:
    that holds when there is no cache and padding is only on the right, because a real
    query never looks right of itself. Queries at padding positions would otherwise see
    no key at all (a row of -inf, NaN after softmax), so each query always sees itself;
    their outputs are unused either way.
    """
    m = attention_mask.bool()  # (B, S)
    if past == 0 and bool((m[:, :-1] >= m[:, 1:]).all()):  # right-padded (or unpadded)
        return None
    S = m.shape[1]
    q_pos = torch.arange(past, past + T, device=m.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=m.device)[None, :]  # (1, S)
    visible = (k_pos <= q_pos) & m[:, None, :]  # (B, T, S)
    visible |= k_pos == q_pos  # each query sees itself
    return visible[:, None]  # (B, 1, T, S)


# SDPA's memory-efficient kernel takes a mask as it is only if every stride but the last is a multiple
# of 8 elements (aten's preprocess_mask); otherwise it pads a copy, in every layer.
MASK_ALIGN = 8


def compute_dtype(x):
    """The dtype attention computes in for hidden states x: autocast's when it is on (the projections
    then return it), else x's own (fp32, or bf16 under FSDP's mixed precision)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def additive_mask(mask, dtype):
    """(B, 1, T, S) bool mask -> the same mask as SDPA adds it to the scores: 0 where the query may see
    the key, -inf where not, in the attention's dtype, each row padded to a multiple of MASK_ALIGN
    (the result is a view of the first S columns).

    SDPA does exactly this to a bool mask, but inside every layer, and each layer then keeps its own
    converted copy for backward (B * T * S * 2 bytes per layer: 3.8 GB over 28 layers at B = 4,
    T = 4096). Built once per forward, every layer gets and saves the same tensor. Each row keeps at
    least one visible key (the query itself), so the softmax never sees a row of -inf alone."""
    B, _, T, S = mask.shape
    padded = -(-S // MASK_ALIGN) * MASK_ALIGN  # ceil to a multiple
    out = torch.full((B, 1, T, padded), float("-inf"), dtype=dtype, device=mask.device)
    out[..., :S].masked_fill_(mask, 0.0)
    return out[..., :S]  # (B, 1, T, S), its rows `padded` elements apart


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

    @staticmethod
    def mask_and_positions(attention_mask, position_ids, B: int, T: int, past: int):
        """The (B, 1, T, S) bool mask (None: plain causal) and (B, T) positions of a given attention_mask."""
        if attention_mask.dim() == 4:  # a ready mask: used as it is
            if attention_mask.dtype != torch.bool or attention_mask.shape != (B, 1, T, past + T):
                raise ValueError(f"a 4-D attention_mask must be bool of shape {(B, 1, T, past + T)}, "
                                 f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs position_ids: positions cannot be counted from it")
            return attention_mask, position_ids
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, T)  # (B, T)
        return attention_mask_4d(attention_mask, T, past), position_ids

    def forward(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None, position_ids=None,
                read_at=None):
        """(B, T) ids -> (B, T, C) hidden states after the final norm.

        attention_mask: (B, S) with 1 on real tokens, padding left or right (S = past + T); or a ready
            boolean (B, 1, T, S) mask, True where query t may see key s, for rows that are not one
            sequence each (packing.py's [prompt | chosen | rejected]); position_ids are then required.
            None: no padding, or padding only on the right, whose positions no real token looks at
            (plain causal attention; training's right-padded rows pass None).
        position_ids: (B, T) rotary position of each token; by default counted from the (B, S) mask.
        read_at: (B, n) positions to return, (B, n, C); the last layer then runs only there
            (DecoderLayer.forward_at, the reward model's shortcut).
        """
        B, T = input_ids.shape
        if read_at is not None and kv_cache is not None:
            raise ValueError("read_at and kv_cache do not combine: the last layer would fill the cache at n positions")
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is None and kv_cache is None:  # rows without padding: plain causal attention,
            mask = None  # and no padding to look for (attention_mask_4d's check would wait for the GPU)
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            mask, position_ids = self.mask_and_positions(attention_mask, position_ids, B, T, past)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta,
                                self.cfg.rope_scaling)  # (B, T, D) each
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if mask is not None and kv_cache is None:  # a training or scoring forward over whole rows
            mask = additive_mask(mask, compute_dtype(x))  # built once, shared by every layer
        for i, layer in enumerate(self.layers):
            run, extra = layer, {"kv_cache": kv_cache, "layer_index": i}
            if read_at is not None and i == len(self.layers) - 1:  # the reward model's shortcut
                run, extra = layer.forward_at, {"at": read_at}  # (B, T, C) -> (B, n, C)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its activations during backward.
                x = checkpoint(run, x, cos=cos, sin=sin, mask=mask, **extra, use_reentrant=False)
            else:
                x = run(x, cos=cos, sin=sin, mask=mask, **extra)
        if kv_cache is not None:
            kv_cache.length += T
        if read_at is not None and not self.layers:  # no layer to narrow: pick the positions here
            x = take_positions(x, read_at)
        return self.norm(x)  # (B, T, C), or (B, n, C) with read_at


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

    def hidden_states(self, input_ids, attention_mask=None, kv_cache=None, position_ids=None):
        """(B, T) -> (B, T, C) after the final norm; training projects only labelled positions.
        Arguments as Backbone.forward."""
        return self.model(input_ids, attention_mask, kv_cache, position_ids=position_ids)

    def forward(self, input_ids, attention_mask=None, kv_cache=None, position_ids=None):
        return self.lm_head(self.hidden_states(input_ids, attention_mask, kv_cache, position_ids))  # (B, T, V)


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
        """(B, T) ids -> (B,) fp32 rewards, each read at its row's last real token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = last_token_index(attention_mask)  # (B,)
        return self.rewards_at(input_ids, attention_mask, last[:, None])[:, 0]  # (B,)

    def rewards_at(self, input_ids, attention_mask, at, position_ids=None):
        """score(h) at positions at (B, n) of each row -> (B, n) fp32; the last layer runs only there.
        attention_mask and position_ids as Backbone.forward."""
        h = self.model(input_ids, attention_mask, position_ids=position_ids, read_at=at)  # (B, n, C)
        return score_in_fp32(self.score, h)  # (B, n)


def score_in_fp32(head: nn.Linear, h):
    """The scalar head's dot products in fp32, (B, n, C) -> (B, n), also under autocast or FSDP's bf16
    compute: a bf16 output has 8 significant bits, so rewards near |r| = 4 would lie 2^-5 = 0.031
    apart and distinct answers would tie. C multiply-adds per reward cost nothing next to the layers."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        if head.weight.dtype == torch.float32:  # through the module: sharded (fsdp.py), its forward gathers the weight
            return head(h.float()).squeeze(-1)  # (B, n, 1) -> (B, n)
        return F.linear(h.float(), head.weight.float()).squeeze(-1)  # a head loaded in bf16: upcast exactly


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
