"""What one unit of each stage of experiments/hh_dpo_sweep.sh costs, in CPU seconds of one thread,
so that the sweep can be sized on a machine that others are using (wall times are then meaningless,
but the CPU time a single-threaded process spends is roughly what it would spend alone).

    OMP_NUM_THREADS=1 python experiments/measure_sweep_costs.py MODEL DATA [--max_length 192 ...]

Measures, on real pairs and prompts of DATA with the real model MODEL (fp32, one thread):
  dpo_step_per_pair     one DPO training step (forward + backward of the [2B, T] batch, AdamW), per pair
  ref_per_pair          the reference forward that --precompute_ref does once per pair
  generate_per_answer   sampling one answer of up to --max_new_tokens (batch --eval_batch), KV cache
  forward_per_answer    one teacher-forced forward of a prompt + answer (the KL's, and about the
                        reward model's scoring) per answer
and prints one JSON line. To turn these into quiet wall-clock seconds on 2 threads, divide by the
measured 2-thread speed-up, or calibrate against a stage timed on a quiet machine (the script's
caller does this; see the header of hh_dpo_sweep.sh).
"""
import argparse
import json
import statistics
import time

import torch

from minialign import load_model, load_tokenizer
from minialign.collate import tokenize_pairs
from minialign.data import load_preferences, prompts_view
from minialign.eval_models import answer_logprobs
from minialign.generate import encode_prompts, generate_tokens, row_seeds
from minialign.dpo import dpo_loss
from minialign.packing import answer_logps, collate_pairs
from minialign.train import build_optimizer


def cpu_seconds(fn, repeats: int) -> float:
    """Median CPU time of fn() over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--max_prompt_length", type=int, default=96)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=4, help="pairs per micro-step")
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--eval_batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)

    tok = load_tokenizer(args.model)
    pairs, _ = load_preferences(args.data)
    items, _ = tokenize_pairs(tok, pairs[:400], max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(items), generator=g).tolist()  # random batches: typical padding
    model = load_model(args.model)
    optimizer = build_optimizer(model, 1e-6, 0.0)
    pairs_per_step = args.batch_size * args.grad_accum
    steps = iter(range(10_000))

    def dpo_step():
        k = next(steps)
        for m in range(args.grad_accum):
            idx = order[(k * pairs_per_step + m * args.batch_size) % len(order):][:args.batch_size]
            batch = collate_pairs([items[i] for i in idx], tok.pad_token_id)
            chosen, rejected = answer_logps(model, batch)[:2]
            losses, _, _ = dpo_loss(chosen, rejected, chosen.detach() + 1.0, rejected.detach(), beta=0.1)
            (losses.sum() / pairs_per_step).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = {"threads": torch.get_num_threads(), "max_length": args.max_length,
           "max_prompt_length": args.max_prompt_length, "max_new_tokens": args.max_new_tokens}
    out["dpo_step_per_pair"] = cpu_seconds(dpo_step, args.repeats) / pairs_per_step
    model.eval()

    def reference():
        with torch.no_grad():
            answer_logps(model, collate_pairs([items[i] for i in order[:args.eval_batch]], tok.pad_token_id))
    out["ref_per_pair"] = cpu_seconds(reference, args.repeats) / args.eval_batch

    prompts = prompts_view(pairs[400:])[:args.eval_batch]
    prompt_ids = [ids[-args.max_prompt_length:] for ids in encode_prompts(tok, prompts)]
    answers = []

    def generate():
        out_ids, _ = generate_tokens(model, prompt_ids, tok.eos_token_ids, tok.pad_token_id, args.max_new_tokens,
                                     0.7, top_p=0.9, seeds=row_seeds(len(answers), len(prompt_ids)), keep_eos=True)
        answers[:] = out_ids
    out["generate_per_answer"] = cpu_seconds(generate, 1) / args.eval_batch
    out["generated_tokens_mean"] = statistics.mean(len(a) for a in answers)
    out["forward_per_answer"] = cpu_seconds(lambda: answer_logprobs(model, prompt_ids, answers, tok.pad_token_id),
                                            args.repeats) / args.eval_batch
    print(json.dumps(out))


if __name__ == "__main__":
    main()
