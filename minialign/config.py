"""A model's hyperparameters, read from and written back to a Hugging Face config.json.

ModelConfig holds what model.py needs to build a network; from_hf_dict validates a config
and refuses what is not implemented (naming the key), to_hf_dict writes the original keys back,
updated, so a saved checkpoint loads in transformers too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import UserError

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
# RoPE frequency scalings implemented (model.rope_inverse_frequencies), with the keys each needs.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeScaling:
    """How config.json stretches RoPE to a longer context than pretraining saw (Llama 3.1 / 3.2:
    rope_type "llama3", factor 8 or 32, low_freq_factor 1, high_freq_factor 4, 8192 positions)."""

    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float | None = None  # llama3 only, like the two below
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


def read_rope(d: dict, source: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling or None) from either spelling of config.json:
    transformers 4.x: top-level "rope_theta" and "rope_scaling": {"rope_type" (or "type"), "factor", ...};
    transformers 5.x: "rope_parameters": {"rope_theta", "rope_type", "factor", ...}.
    Rope types other than default, linear and llama3 are refused by name."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    key, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params)
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise UserError(f"{source}: '{key}.rope_type' = {rope_type!r} is not implemented (minialign implements "
                        f"default, {', '.join(ROPE_SCALING_KEYS)})")
    if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{source}: 'partial_rotary_factor' != 1 is not implemented (RoPE on every dimension only)")
    values = dict(rope)
    if rope_type == "llama3":  # as transformers: a top-level value wins, then max_position_embeddings
        original = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        values["original_max_position_embeddings"] = original or d.get("max_position_embeddings")
    for name in ROPE_SCALING_KEYS[rope_type]:
        if not isinstance(values.get(name), (int, float)) or values[name] <= 0:
            raise UserError(f"{source}: '{key}' needs a positive number '{name}' for rope_type "
                            f"{rope_type!r}, got {values.get(name)!r}")
    out = RopeScaling(rope_type, **{name: values[name] for name in ROPE_SCALING_KEYS[rope_type]})
    if rope_type == "llama3" and out.high_freq_factor <= out.low_freq_factor:
        raise UserError(f"{source}: '{key}': high_freq_factor {out.high_freq_factor} must be above "
                        f"low_freq_factor {out.low_freq_factor}")
    return theta, out


# Sizes that must be positive integers (head_dim and num_key_value_heads only when given).
# num_hidden_layers may be 0: embeddings, final norm and head alone still make a (degenerate) model.
POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim")


def _check_values(d: dict, source: str) -> None:
    """Refuse values no network can be built from, naming the key, before anything uses them
    (a zero head count would divide by zero; a NaN rms_norm_eps would surface only later, as a
    non-finite loss that looks like a learning-rate problem)."""
    for key in POSITIVE_INT_KEYS:
        value = d.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue  # optional: default to num_attention_heads and hidden_size / heads
        low = 0 if key == "num_hidden_layers" else 1
        if key in d and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise UserError(f"{source}: '{key}' = {value!r} must be an integer >= {low}")
    rope = d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{source}: 'rope_parameters' = {rope!r:.80} must be an object")
    for key, value in (("rms_norm_eps", d.get("rms_norm_eps")), ("rope_theta", d.get("rope_theta")),
                       ("rope_parameters.rope_theta", rope.get("rope_theta"))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"{source}: '{key}' = {value!r} must be a finite positive number")
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    if not d.get("head_dim") and heads and hidden and hidden % heads:
        raise UserError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}, "
                        "and there is no 'head_dim' to say how wide each head is")


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
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
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

        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object of settings, got {type(d).__name__}")

        def need(key):
            if key not in d:
                raise UserError(f"{source}: missing required key '{key}'")
            return d[key]

        _check_values(d, source)

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"{source}: model_type '{model_type}' is not implemented "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        rope_theta, rope_scaling = read_rope(d, source)
        if d.get("use_sliding_window"):
            raise UserError(f"{source}: 'use_sliding_window': true is not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: 'hidden_act' = {d['hidden_act']!r} is not implemented (only silu)")
        if d.get("mlp_bias"):
            raise UserError(f"{source}: 'mlp_bias': true is not implemented")
        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UserError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads {kv_heads}")
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
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
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
