"""The models run over evaluation data: batches shared among the ranks (map_batches), DPO's implicit
rewards of pairs, and the log-probabilities of given answers (for the KL from the base). What
evaluation.py computes from these numbers is plain statistics.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .packing import IGNORE_INDEX, answer_logps, collate, sequence_logprobs_from_hidden
from .progress import Progress


# ------------------------------------------------------------------- sharding over ranks

def batch_ranges(n_items: int, batch_size: int) -> list[range]:
    """Items 0 .. n-1 cut into consecutive batches of batch_size (the last may be shorter)."""
    return [range(start, min(start + batch_size, n_items)) for start in range(0, n_items, batch_size)]


def length_order(lengths) -> list[int]:
    """Item indices sorted by length, shortest first; equal lengths keep their item order (a stable
    sort, so the batches depend on the lengths alone, the same on every rank)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def map_batches(fn, n_items: int, batch_size: int, env, label: str, unit: str, lengths=None) -> list:
    """fn over the batches of items 0 .. n-1, shared among the ranks; every rank gets every item's
    result back, in item order.

    fn(indices) -> one result per index (picklable: texts, numbers, id lists). indices is a range of
    consecutive items; with lengths ((n,) tokens per item) it is a list instead: the items are
    sorted by length first (length_order) and cut into batches in that order, so the rows padded
    together have similar lengths, as in training's length-grouped batches (the padding of a
    batch is then a few tokens, not the spread of the whole data set). The results still come back
    in item order.
    Batch b runs on rank b % world_size, and holds exactly the items it holds in one process: the
    same rows padded together, so every computed number (and every sampled token, generation being
    seeded per prompt) is the same whatever the number of ranks. The results travel to all ranks
    with all_gather_object (small lists; the work, not the gathering, is what takes time).
    env: a minialign.distributed.DistEnv. Progress lines (rank 0) count rank 0's share."""
    if lengths is None:
        batches = batch_ranges(n_items, batch_size)
    else:
        if len(lengths) != n_items:
            raise ValueError(f"map_batches: {len(lengths)} lengths for {n_items} items")
        order = length_order(lengths)
        batches = [order[r.start:r.stop] for r in batch_ranges(n_items, batch_size)]
    mine = list(enumerate(batches))[env.rank::env.world_size]
    share = sum(len(batch) for _, batch in mine)
    if env.world_size > 1:
        label = f"{label} (rank 0's share, {env.world_size} ranks)"
    progress = Progress(label, share, unit, enabled=env.is_main)
    results = []
    for b, batch in mine:
        out = list(fn(batch))
        if len(out) != len(batch):
            raise RuntimeError(f"map_batches: {label} returned {len(out)} results for {len(batch)} items")
        results.append((b, out))
        progress.advance(len(batch))
    if env.world_size > 1:
        everyone = [None] * env.world_size
        dist.all_gather_object(everyone, results)
        results = [r for rank_results in everyone for r in rank_results]
    by_item = [None] * n_items
    for b, out in results:
        for i, item in zip(batches[b], out):
            by_item[i] = item
    return by_item


# -------------------------------------------------------------------- DPO implicit reward

def implicit_rewards(policy, ref_model, items, beta: float, batch_size: int, pad_token_id: int):
    """DPO's implicit reward r(x, y) = beta * (log pi(y|x) - log ref(y|x)) (Rafailov et al. 2023,
    eq. 5, up to beta * log Z(x), which cancels between chosen and rejected) of every pair.

    items: TokenizedPairs (minialign.collate.tokenize_pairs), batch_size pairs per forward in
    training's layout: one packed row per pair, the prompt computed once (packing.py; two rows per
    pair when a prompt is empty). Returns four lists of floats: chosen rewards, rejected rewards,
    policy log-probs [(chosen, rejected)], ref log-probs.
    """
    device = next(policy.parameters()).device
    chosen, rejected, pol_lp, ref_lp = [], [], [], []
    with torch.no_grad():  # evaluation only: no graph, half the memory
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = collate(chunk, pad_token_id, packed=all(it.prompt_ids for it in chunk)).to(device)
            pc, pr = (t.double() for t in answer_logps(policy, batch)[:2])   # (B,) each, summed log-probs
            rc, rr = (t.double() for t in answer_logps(ref_model, batch)[:2])
            chosen += (beta * (pc - rc)).tolist()
            rejected += (beta * (pr - rr)).tolist()
            pol_lp += list(zip(pc.tolist(), pr.tolist()))
            ref_lp += list(zip(rc.tolist(), rr.tolist()))
    return chosen, rejected, pol_lp, ref_lp


# ------------------------------------------------------------ log-probs of given answers

def scored_answer_ids(token_ids, finished, stop_ids) -> list[list[int]]:
    """The tokens an answer consists of, as the model chose them: its text tokens and, when it
    stopped (finished), the end-of-turn / EOS id it stopped on (stop_ids[i]); a row cut at
    max_new_tokens has none. Choosing to stop is one of the policy's decisions, so it is scored."""
    return [list(t) + [s] if f else list(t) for t, f, s in zip(token_ids, finished, stop_ids, strict=True)]


@torch.no_grad()
def answer_logprobs(model, prompt_ids, answer_ids, pad_token_id: int) -> list[float]:
    """Teacher forcing: sum_t log p(y_t | x, y_<t) of each answer y after its prompt x, one batch.

    prompt_ids, answer_ids: B id lists each (the prompt exactly as the model saw it when it
    generated, the answer as scored_answer_ids gives it). The rows [x | y] are right-padded into
    one (B, T) batch, labelled on y only (IGNORE_INDEX on prompt and padding), and only the
    labelled positions are projected onto the vocabulary (packing.sequence_logprobs_from_hidden,
    fp32). Returns B floats."""
    device = next(model.parameters()).device
    rows = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)   # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)          # (B, T)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)     # (B, T)
    for r, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        input_ids[r, :len(p) + len(a)] = torch.tensor(list(p) + list(a), dtype=torch.long)
        attention_mask[r, :len(p) + len(a)] = 1
        labels[r, len(p):len(p) + len(a)] = torch.tensor(list(a), dtype=torch.long)
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    hidden = model.hidden_states(input_ids, attention_mask)  # (B, T, C)
    logps, _ = sequence_logprobs_from_hidden(hidden, model.lm_head.weight, labels)  # (B,) summed
    return logps.double().tolist()
