"""minialign's RM and DPO training throughput against TRL and a plain transformers loop.

    /work/refenv/bin/python bench/bench_vs_reference.py            # fixed lengths + HH-RLHF lengths
    /work/refenv/bin/python bench/bench_vs_reference.py --quick    # fewer rounds and steps
    python bench/bench_vs_reference.py                             # no transformers/trl: says so, exits

Two workloads, each measured with the implementations alternating rounds in one run
(common.alternate), each in its own process, all on the same random-initialised checkpoint:
  fixed      B pairs of prompt 128 + response 128 tokens per step (the issue's shape: 2 pairs x 256)
  realistic  the HH-RLHF harmless-base pairs, tokenized as minialign trains on them. Every round
             each implementation trains on the same pool of pairs: TRL in random batches (its
             default order), minialign in length-grouped batches (sampler.global_batches(lengths=)),
             so both process the same non-pad tokens and the ratio of times is the ratio of rates.
tokens/s counts non-pad tokens; a round's rate is its tokens over its seconds; the figure is the
median over rounds after a warm-up step.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile

import torch

from common import (SHAPES, Report, Worker, alternate, batch_stats, device_and_dtype, environment, hh_rlhf_pairs,
                    make_batches, random_pairs, save_random_checkpoint)
from minialign.sampler import global_batches


def have_references() -> bool:
    try:
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def compare(report, kind, shape, ckpt, items, ml_order, ref_order, args, device, dtype, workload):
    """minialign vs TRL, then minialign vs the transformers loop (two processes alive at a time)."""
    import minialign_steps
    import reference_steps

    cfg = SHAPES[shape]
    ml_batches = make_batches(items, ml_order, cfg["pad_token_id"])
    ref_batches = make_batches(items, ref_order, cfg["pad_token_id"])
    ml_stats, ref_stats = batch_stats(ml_batches), batch_stats(ref_batches)
    common = dict(dtype=dtype, device=str(device))
    ml_factory = minialign_steps.dpo_worker if kind == "dpo" else minialign_steps.rm_worker
    trl_factory = reference_steps.trl_dpo_worker if kind == "dpo" else reference_steps.trl_rm_worker
    hf_factory = reference_steps.hf_loop_dpo_worker if kind == "dpo" else reference_steps.hf_loop_rm_worker
    tokens_per_step = [int(b["attention_mask"].sum()) for b in ref_batches]
    opponents = [
        ("trl", lambda: Worker("trl", trl_factory, args.threads, checkpoint=str(ckpt), items=items, order=ref_order,
                               vocab_size=cfg["vocab_size"], pad_id=cfg["pad_token_id"], eos_id=cfg["eos_token_id"],
                               tokens_per_step=tokens_per_step, **common)),
        ("transformers_loop", lambda: Worker("transformers_loop", hf_factory, args.threads, checkpoint=str(ckpt),
                                             batches=ref_batches, **common)),
    ]
    steps = len(ml_order) if workload == "realistic" else args.steps
    for ref_name, make_ref in opponents:
        if ref_name not in args.references:
            continue
        ml = Worker("minialign", ml_factory, args.threads, checkpoint=str(ckpt), batches=ml_batches, **common)
        try:
            ref = make_ref()
            try:
                res = alternate([ml, ref], args.rounds, steps, warmup_steps=1, device=device)
            finally:
                ref.close()
        finally:
            ml.close()
        a, b = res["minialign"], res[ref_name]
        ratios = [x / y for x, y in zip(a.rounds, b.rounds)]
        for m, stats, order in ((a, ml_stats, "length-grouped" if workload == "realistic" else "fixed"),
                                (b, ref_stats, "random" if workload == "realistic" else "fixed")):
            report.add(name=f"{kind}/{workload}/{m.name}", vs=ref_name, shape=shape, dtype=dtype,
                       batch_pairs=len(ml_order[0]), order=order, padding=stats["padding"],
                       tokens_per_s=m.tokens_per_s, step_s=m.median_step_s, peak_mb=m.peak_mb,
                       ratio=statistics.median(ratios) if m is a else None,
                       ratio_rounds=[round(r, 3) for r in ratios] if m is a else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen0.5b-4l", choices=list(SHAPES))
    p.add_argument("--batch_pairs", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--response_len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per round (fixed lengths)")
    p.add_argument("--pool_steps", type=int, default=8, help="realistic: steps per round (pool = this x batch pairs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", default="fixed,realistic")
    p.add_argument("--kinds", default="dpo,rm")
    p.add_argument("--references", default="trl,transformers_loop")
    p.add_argument("--quick", action="store_true", help="small shape, 2 rounds, fixed lengths only")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.workloads = "small", 2, "fixed"
    torch.set_num_threads(args.threads)
    print("environment:", environment(), flush=True)
    if not have_references():
        print("transformers and trl are not installed: nothing to compare against (run with /work/refenv/bin/python)")
        return 0
    device, dtype = device_and_dtype()
    report = Report(f"minialign vs references ({args.shape}, {dtype}, {args.threads} threads)")
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        for kind in args.kinds.split(","):
            ckpt = save_random_checkpoint(args.shape, f"{tmp}/{kind}", reward=kind == "rm")
            if "fixed" in args.workloads:
                n = args.batch_pairs * max(args.steps, 1)
                items = random_pairs(args.shape, n, args.prompt_len, args.response_len)
                order = [list(range(i, i + args.batch_pairs)) for i in range(0, n, args.batch_pairs)]
                compare(report, kind, args.shape, ckpt, items, order, order, args, device, dtype, "fixed")
            if "realistic" in args.workloads:
                items = hh_rlhf_pairs()
                if items is None:
                    print("realistic: the HH-RLHF data or the Qwen3 tokenizer is absent under $MINIALIGN_SHARED; skipped")
                    continue
                n = args.batch_pairs * args.pool_steps
                pool = random.Random(0).sample(items, n)  # the same pairs for both sides
                lengths = [it.length for it in pool]
                grouped = global_batches(n, args.batch_pairs, seed=0, epoch=0, lengths=lengths,
                                         batches_per_group=args.pool_steps)
                shuffled = global_batches(n, args.batch_pairs, seed=0, epoch=0)
                compare(report, kind, args.shape, ckpt, pool, grouped, shuffled, args, device, dtype, "realistic")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.table(["name", "vs", "order", "padding", "tokens_per_s", "step_s", "peak_mb", "ratio"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
