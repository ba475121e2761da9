"""Batched generation with a KV cache: one prefill over the left-padded prompts, then one token
at a time, each row stopping on its first stop id: tokenizer.eos_token_ids, which begins with the
chat template's end-of-turn token (<|im_end|>, <|eot_id|>, </s>, ...; minialign.tokenizer).

Left padding keeps every prompt's last token in the final column, so the next-token logits of
the whole batch are one slice; positions come from the attention mask (model.py), so padding
never shifts the rotary phases.

Sampling is seeded per prompt, not per call: row i draws from its own generator (`row_seeds`,
or the caller's `seeds`), so a prompt's answer does not depend on which other prompts share its
batch, on the batch size, or on how prompts are split over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .collate import collate_prompts
from .model import KVCache

# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so row seeds live in
# [0, 2**32). Row i of a job seeded s gets (s * SEED_SPREAD + i) mod 2**32: distinct for every row
# of a job, and the jobs of nearby seeds (0, 1, 2, ...) start ~2**32 / 1.618 apart, far from
# overlapping (Knuth's multiplicative hashing constant, an odd number near 2**32 / golden ratio).
SEED_SPREAD = 2654435761
SEED_SPACE = 2**32


@dataclass
class Generation:
    texts: list[str]  # decoded responses, special tokens removed
    token_ids: list[list[int]]  # response tokens, without the stopping EOS
    finished: list[bool]  # True where the row stopped on an EOS id before max_new_tokens
    prompt_ids: list[list[int]]
    stop_ids: list[int | None] | None = None  # per row the EOS id it stopped on, None if cut (when known)


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Message lists are rendered with the chat template and its generation prompt;
    strings are taken as already-formatted text and encoded verbatim."""
    out = []
    for p in prompts:
        text = p if isinstance(p, str) else tokenizer.apply_chat_template(p, add_generation_prompt=True)
        out.append(tokenizer.encode(text))
    return out


def row_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """The seeds of rows start .. start + n - 1 of a generation seeded `seed`."""
    return [(seed * SEED_SPREAD + start + i) % SEED_SPACE for i in range(n)]


def sample_next(logits, temperature: float, top_k: int | None, top_p: float | None, generator):
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy (argmax).

    generator: one torch.Generator for the whole batch, or a list of B, one per row (each row's
    draw then depends on its own generator alone)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose
        # probabilities sum to at least top_p; the most likely token is always kept.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already >= p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model, tokenizer, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    batch_size: int | None = None, use_cache: bool = True, seeds: list[int] | None = None,
) -> Generation:
    """Generate a response for each prompt (message list or pre-formatted string).

    Rows are processed `batch_size` at a time (all at once by default). Sampling is seeded per
    prompt (module docstring): the same seed gives the same texts whatever the batch size. See
    generate_tokens for use_cache and seeds.
    """
    prompt_ids = encode_prompts(tokenizer, prompts)
    out_ids, finished = generate_tokens(
        model, prompt_ids, tokenizer.eos_token_ids, tokenizer.pad_token_id, max_new_tokens,
        temperature, top_k, top_p, seed, batch_size, use_cache, seeds,
    )
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out_ids]
    return Generation(texts, out_ids, finished, prompt_ids)


@torch.no_grad()
def generate_tokens(
    model, prompt_ids: list[list[int]], eos_token_ids, pad_token_id: int, max_new_tokens: int = 128,
    temperature: float = 0.0, top_k=None, top_p=None, seed=None, batch_size=None, use_cache: bool = True,
    seeds: list[int] | None = None, keep_eos: bool = False,
):
    """Token-level generation: prompt id lists -> (response id lists, finished flags).

    A response stops before the EOS id it ended on; with keep_eos=True a finished response ends
    with that id (which of tokenizer.eos_token_ids it was), e.g. to score the decision to stop.

    seeds: one per prompt, for a caller that generates a slice of a larger job (a rank's share):
    giving row_seeds(seed, n, start) reproduces rows start .. start + n - 1 of the whole job.
    Default: row_seeds(seed, len(prompt_ids)), with seed drawn from torch's global generator when None.
    With use_cache=False every step recomputes the full forward: slow, used to test that the
    cache is exact."""
    batch_size = batch_size or len(prompt_ids)
    device = next(model.parameters()).device
    if temperature == 0:  # greedy: nothing is drawn, and torch's global generator is left alone
        generators = [None] * len(prompt_ids)
    else:
        if seeds is None:
            seed = int(torch.randint(0, SEED_SPACE, ())) if seed is None else seed
            seeds = row_seeds(seed, len(prompt_ids))
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    was_training = model.training
    model.eval()
    out_ids, finished = [], []
    for start in range(0, len(prompt_ids), batch_size):
        ids, done = _generate_batch(
            model, prompt_ids[start : start + batch_size], list(eos_token_ids), pad_token_id, max_new_tokens,
            temperature, top_k, top_p, generators[start : start + batch_size], use_cache, device, keep_eos,
        )
        out_ids += ids
        finished += done
    model.train(was_training)
    return out_ids, finished


def _generate_batch(model, prompts, eos_ids, pad_id, max_new_tokens, temperature, top_k, top_p, generator, use_cache,
                    device, keep_eos=False):
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    batch = collate_prompts(prompts, pad_id)  # left-padded (B, P)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    B, P = ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, P + max_new_tokens, device, dtype) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)  # stopped on an EOS id
    new_tokens = []
    step_ids = ids  # prefill: the whole prompt; then only the newest token
    for _ in range(max_new_tokens):
        if use_cache:
            h = model.hidden_states(step_ids, mask, cache)[:, -1]  # (B, C)
        else:
            h = model.hidden_states(torch.cat([ids] + new_tokens, dim=1) if new_tokens else ids, mask)[:, -1]
        logits = model.lm_head(h)  # (B, V): only the last position needs the vocabulary projection
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        is_eos = torch.isin(nxt, eos) & ~done
        stopped |= is_eos
        done |= is_eos
        new_tokens.append(nxt[:, None])
        mask = torch.cat([mask, (~done | is_eos).long()[:, None]], dim=1)  # (B, P + t)
        step_ids = nxt[:, None]
        if bool(done.all()):
            break
    gen = torch.cat(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(B)]
    eos_set = set(eos_ids)
    out = []
    for row in gen:  # cut each row at its first EOS (the EOS itself is not part of the response)
        cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
        out.append(row[:cut + 1] if keep_eos and cut < len(row) else row[:cut])
    return out, stopped.tolist()
