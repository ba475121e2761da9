"""Do these pieces fit together? Checks made where a model folder, a tokenizer and a second model
meet, before any heavy work, so that a mismatch is one clear line and not a raw IndexError at
step 1 or a silently wrong number at the end.

  check_model_kind       a folder holds the kind of model a command needs (a causal LM or a
                         reward model), and its checkpoint loads (every check of load_model,
                         from config.json and the safetensors headers, without reading a weight)
  check_tokenizer_fits   every id the tokenizer can produce has a row in the model's embedding
  check_same_tokenizer   two tokenizers agree on vocabulary, special tokens and chat format, so
                         that token ids computed with one mean the same under the other
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import inspect_checkpoint
from .config import ModelConfig
from .errors import UserError

# Conversations rendered by both tokenizers to compare their chat formats: with and without a
# system turn (templates differ in the default system prompt they add), a finished exchange and
# an open user turn exercise every rule the supported templates have.
EXCHANGE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
PROBE_CONVERSATIONS = (EXCHANGE, [{"role": "system", "content": "S"}] + EXCHANGE)
# The parts of tokenizer.json that decide which ids a text becomes (not runtime padding or truncation).
ENCODING_SECTIONS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def describe_kind(config: ModelConfig) -> str:
    """'a reward model (Qwen2ForSequenceClassification)' or 'a causal LM (...)', from config.json."""
    kind = "a reward model" if config.is_reward_model else "a causal LM"
    architectures = config.raw.get("architectures") or ["no 'architectures' in config.json"]
    return f"{kind} ({', '.join(map(str, architectures))})"


def check_model_kind(path, reward: bool, what: str) -> ModelConfig:
    """The config of the checkpoint at `path`, after checking that it loads and is a reward model
    (`reward=True`: a *ForSequenceClassification architecture) or a causal LM. `what` names the
    slot in messages, e.g. the flag "--reward_model"."""
    config, _, _ = inspect_checkpoint(path)
    if config.is_reward_model != reward:
        needs = ("a reward model (a *ForSequenceClassification checkpoint, as train_rm.py writes)" if reward
                 else "a causal language model (a *ForCausalLM checkpoint)")
        raise UserError(f"{what} {path} holds {describe_kind(config)}, but {what} needs {needs}")
    return config


def max_token_id(tokenizer) -> int:
    """The largest id the tokenizer can produce, added tokens included."""
    return max(tokenizer.backend.get_vocab(with_added_tokens=True).values())


def check_tokenizer_fits(config: ModelConfig, tokenizer, model_dir, tokenizer_dir=None) -> None:
    """Every token id must index a row of the embedding (config.json's vocab_size rows; a model may
    have more rows than the tokenizer has tokens, never fewer). tokenizer_dir: where the tokenizer
    was loaded from, when not model_dir."""
    top = max_token_id(tokenizer)
    if top >= config.vocab_size:
        source = tokenizer_dir if tokenizer_dir is not None else model_dir
        raise UserError(
            f"the tokenizer of {source} produces token ids up to {top}, but the model in {model_dir} has only "
            f"{config.vocab_size} embedding rows (config.json vocab_size): they do not belong together; "
            f"use the tokenizer saved with the model")


def _encoding_hash(tokenizer) -> str:
    sections = json.loads(tokenizer.backend.to_str())
    text = json.dumps([sections.get(k) for k in ENCODING_SECTIONS], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _rendered_probes(tokenizer) -> list[str]:
    try:
        return [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in PROBE_CONVERSATIONS]
    except ValueError:  # no chat template: its absence is itself part of the signature
        return ["(no chat template)"]


def tokenizer_signature(tokenizer) -> dict:
    """What must agree for token ids to mean the same under two tokenizers: the vocabulary (size and a
    hash of vocabulary, merges, added tokens and pre-tokenization), the ids of the special tokens a
    sequence is built around, and the chat format (probe conversations, rendered). The pad id is
    left out: padding is masked, so any id serves."""
    return {
        "vocabulary size": tokenizer.vocab_size,
        "vocabulary (hash of tokenizer.json's model, added tokens, normalizer, pre-tokenizer)": _encoding_hash(tokenizer),
        "end-of-sequence ids": list(tokenizer.eos_token_ids),
        "end-of-turn id": tokenizer.end_of_turn_token_id,
        "bos id": tokenizer.bos_token_id,
        "chat format (probe conversations rendered)": _rendered_probes(tokenizer),
    }


def check_same_tokenizer(tokenizer_a, dir_a, tokenizer_b, dir_b, what_a: str, what_b: str) -> None:
    """Refuse two tokenizers that would give the same text different ids or a different layout,
    naming both folders and what differs (e.g. a DPO policy and its reference: log pi - log ref is
    meaningful only over the same token sequence)."""
    a, b = tokenizer_signature(tokenizer_a), tokenizer_signature(tokenizer_b)
    differences = []
    for key in a:
        if a[key] != b[key]:
            shown = "" if "hash" in key or "probe" in key else f" ({a[key]} vs {b[key]})"
            differences.append(f"{key}{shown}")
    if differences:
        raise UserError(f"{what_a} {Path(dir_a)} and {what_b} {Path(dir_b)} use different tokenizers: "
                        f"{'; '.join(differences)} differ; both must use the same tokenizer and chat format")


__all__ = ["check_model_kind", "check_tokenizer_fits", "check_same_tokenizer", "tokenizer_signature",
           "describe_kind", "max_token_id"]
