"""The policy and its base answer the same prompts: the generation stage of `evaluate.py dpo`.

    asked_ids  = each prompt's token ids, repeated k times in a row (k answers per prompt)
    policy     = the policy's answers      (row i sampled with seed row_seeds(seed)[i])
    base       = the base model's answers  (the same row seeds: a prompt's two answers differ by
                                            the model alone, never by the randomness)
    KL         = log pi(y) - log pi_base(y), summed over each of the policy's answers y, both
                 models scoring the same tokens (evaluation.sampled_kl turns these into the KL)

The two models are loaded one at a time, so a checkpoint twice the size still fits: the policy
answers and scores its own answers, is freed, then the base answers and scores the policy's.
`--generation_cache` stores the base's answers (and, in eval_dpo.py, their rewards) under a key of
everything they depend on (minialign.answer_cache), so a sweep of policies against one base samples
the base once. Under torchrun the batches are shared among the ranks (eval_models.map_batches);
rank 0 reads and writes the cache, and every rank receives what it read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .answer_cache import cache_key, folder_fingerprint, ids_digest, read_cached, write_cached
from .distributed import broadcast_object, print0
from .eval_models import answer_logprobs, map_batches, scored_answer_ids
from .generate import Generation, encode_prompts, generate_tokens, row_seeds


@dataclass(frozen=True)
class Sampling:
    """How answers are sampled (evaluate.py dpo's flags of the same names)."""
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float  # nucleus mass in (0, 1]; 1 keeps every token
    seed: int  # row i of a job draws from row_seeds(seed)[i]
    batch_size: int  # prompts per generate call (it decides which rows are padded together)


def prompt_ids_kept_end(tokenizer, prompts, max_prompt_length: int) -> tuple[list[list[int]], list[bool]]:
    """Each prompt rendered with its generation prompt and encoded; one longer than
    max_prompt_length keeps its last tokens (the latest turns, as training keeps them).
    Returns (id lists, whether each was cut)."""
    ids = encode_prompts(tokenizer, prompts)
    return [p[-max_prompt_length:] for p in ids], [len(p) > max_prompt_length for p in ids]


def sample_answers(model, tokenizer, prompt_ids, sampling: Sampling, env, label: str) -> Generation:
    """Answer every prompt (this rank's batches of them) with a loaded causal LM. Row i is seeded
    row_seeds(seed)[i] whichever model answers; each finished row records the EOS id it stopped on."""
    def answer(idx):
        out, finished = generate_tokens(
            model, [prompt_ids[i] for i in idx], tokenizer.eos_token_ids, tokenizer.pad_token_id,
            sampling.max_new_tokens, sampling.temperature, top_p=sampling.top_p,
            seeds=row_seeds(sampling.seed, len(idx), idx.start), keep_eos=True)
        return [(tokenizer.decode(t[:-1] if f else t, skip_special_tokens=True), t[:-1] if f else t, f,
                 t[-1] if f else None) for t, f in zip(out, finished)]

    rows = map_batches(answer, len(prompt_ids), sampling.batch_size, env, label, "answers")
    texts, token_ids, finished, stop_ids = (list(column) for column in zip(*rows))
    return Generation(texts, token_ids, finished, prompt_ids, stop_ids)


def teacher_forced_logps(model, prompt_ids, answers, pad_token_id: int, batch_size: int, env,
                         label: str) -> list[float]:
    """Summed log-probs of given answers to the prompts under a loaded causal LM (for the KL), in
    length-grouped batches (rows of similar prompt + answer length padded together)."""
    return map_batches(lambda idx: answer_logprobs(model, [prompt_ids[i] for i in idx], [answers[i] for i in idx],
                                                   pad_token_id),
                       len(answers), batch_size, env, label, "answers",
                       lengths=[len(p) + len(a) for p, a in zip(prompt_ids, answers, strict=True)])


class SharedCache:
    """--generation_cache seen by every rank: rank 0 reads and writes the folder (answer_cache.py),
    the others receive what it read. A cache with folder None stores nothing and finds nothing."""

    def __init__(self, folder, env):
        self.folder, self.env = folder, env

    def get(self, kind: str, settings: dict | None):
        """(key, payload), payload None when nothing is stored under the key; (None, None) without a folder."""
        if self.folder is None:
            return None, None
        key = cache_key(settings)
        payload = read_cached(self.folder, kind, key) if self.env.is_main else None
        payload = broadcast_object(payload, self.env)
        if payload is not None:
            print0(self.env, f"{kind}: reused {self.folder}/{kind}-{key}.json (same model files and settings)")
        return key, payload

    def put(self, kind: str, key: str | None, settings: dict | None, payload) -> None:
        if key is not None and self.env.is_main:
            path = write_cached(self.folder, kind, key, settings, payload)
            print0(self.env, f"{kind}: stored in {path}")


def answer_settings(model_dir, tokenizer, prompt_ids, sampling: Sampling, dtype: str, device: torch.device) -> dict:
    """Everything a model's sampled answers depend on: their key in the cache (answer_cache.py)."""
    return {"model_files": folder_fingerprint(model_dir), "prompt_ids": ids_digest(prompt_ids),
            "eos_token_ids": list(tokenizer.eos_token_ids), "pad_token_id": tokenizer.pad_token_id,
            "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": None, "seed": sampling.seed, "batch_size": sampling.batch_size, "dtype": dtype,
            "device": device.type, "torch": torch.__version__}


@dataclass
class BothAnswers:
    policy: Generation
    base: Generation
    base_from_cache: bool
    base_key: str | None  # the base answers' cache key (their rewards' key is built on it), None without a cache
    policy_logps: list[float] | None = None  # log pi of each policy answer (None without the KL)
    base_logps: list[float] | None = None  # log pi_base of the same tokens
    scored_ids: list[list[int]] | None = None  # the tokens both scored: each answer with its stop token


def answers_of_both(load, policy_dir, base_dir, tokenizer, asked_ids, sampling: Sampling, env, cache: SharedCache,
                    dtype: str, kl: bool) -> BothAnswers:
    """The policy's and the base's answers to the same prompts (rows seeded alike), one model in
    memory at a time. load(model_dir, flag) loads a causal LM for inference; the model is freed
    when its work returns."""
    pad, batch = tokenizer.pad_token_id, sampling.batch_size

    def policy_work(model):
        g = sample_answers(model, tokenizer, asked_ids, sampling, env, "generating policy answers")
        own = scored_answer_ids(g.token_ids, g.finished, g.stop_ids)  # the stop token counts (evaluation.py)
        if not kl:
            return g, own, None
        return g, own, teacher_forced_logps(model, asked_ids, own, pad, batch, env, "policy log-probs of its answers")

    policy, scored, policy_lp = policy_work(load(policy_dir, "--policy"))
    settings = answer_settings(base_dir, tokenizer, asked_ids, sampling, dtype, env.device) if cache.folder else None
    key, cached = cache.get("base_answers", settings)
    base = Generation(**cached, prompt_ids=asked_ids) if cached is not None else None
    base_lp = None
    if base is None or kl:  # the base is loaded only when it has something to do
        model = load(base_dir, "--base")
        base = base or sample_answers(model, tokenizer, asked_ids, sampling, env, "generating base answers")
        if kl:
            base_lp = teacher_forced_logps(model, asked_ids, scored, pad, batch, env,
                                           "base log-probs of policy answers")
        del model
        if cached is None:
            cache.put("base_answers", key, settings,
                      {f: getattr(base, f) for f in ("texts", "token_ids", "finished", "stop_ids")})
    return BothAnswers(policy, base, cached is not None, key, policy_lp, base_lp, scored if kl else None)
