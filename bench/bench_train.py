"""minialign's RM and DPO training steps: throughput, peak memory, MFU, gradient checkpointing,
live versus precomputed reference log-probs, and prefix sharing (packed versus two rows).

    python bench/bench_train.py            # the targets: Qwen2.5-0.5B shape with 4 layers, + small at 1024
    python bench/bench_train.py --quick    # small shape, sequence 256 and the HH pairs (a smoke test)
    python bench/bench_train.py --full     # adds small and 0.5B-4L checkpointing at 256, the full 24 layers
    python bench/bench_train.py --only qwen0.5b:1024   # just the 24-layer checkpointing comparison
    python bench/bench_train.py --only qwen0.5b-4l:hh  # just packed versus unpacked on the HH-RLHF pairs
    python bench/bench_train.py --only qwen0.5b:hh --kinds dpo --pool_steps 4 --rounds 2   # the same, 24 layers
    python bench/bench_train.py --only qwen0.5b:1024 --kinds rm --batch_pairs 2 --rounds 1   # a bigger batch

Each comparison runs its two configurations in two processes that alternate rounds
(common.alternate): peak memory is each process's own (RSS on CPU, max allocated on GPU).
The 24-layer model is the exception: two of its processes do not fit in 24 GB together, so its
configurations run one after the other, each alone in memory.

Data. The checkpointing ("ckpt") and reference ("ref") sections: random tokens, prompt = response
= seq/2 per row (every answer ends with EOS), B pairs per step, no padding, in the two-row layout
([2B, T], --layout unpacked, so that they stay comparable with earlier runs; --layout packed runs
them as one row of 1.5 seq per pair). The "layout" section (seq "hh"): the HH-RLHF harmless pairs
as minialign trains on them (Qwen3 tokenizer, chat template; the same pool as bench_vs_reference's
realistic workload), B = 2 pairs per step in length-grouped batches, every round the whole pool,
unpacked then packed (--prefix_sharing). fp32 on CPU, bf16 autocast on GPU.

Throughput counts work in pairs (common.py): pairs/s, and tokens/s = the pairs' non-pad tokens
in the two-row layout per second, whatever the layout computes; positions_per_pair is what the
layout computes (padded slots per pair), real_per_pair its non-pad positions. step_s is the mean
step of a round (median over rounds); the ratios to the first configuration are medians of
per-round ratios (speedup: how many times faster it trains the same pairs).

MFU = achieved matmul FLOP/s of the step / the machine's dense matmul FLOP/s, measured in the
same run between rounds with a large torch.matmul (common.matmul_flops_per_s). Two FLOP counts
(common.step_flops), of the positions the layout computes: "nominal" (6 x params x positions, +
2 x for the reference, vocab projection at every position) and "executed" (the vocabulary
projection only where a label is). Recomputed forwards under gradient checkpointing are not
counted (standard MFU).

activations_mb = peak - the libraries' resident memory (measured in the worker before any model
exists) - the weights, gradients and AdamW moments (+ the reference's weights for live DPO): the
memory that depends on the batch (activations, logits, temporaries), which is what gradient
checkpointing and prefix sharing can shrink.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile

import torch

import minialign_steps
from common import (SHAPES, Report, Worker, alternate, device_and_dtype, environment, fit_vocabulary, hh_rlhf_pairs,
                    layout_stats, make_batches, matmul_flops_per_s, random_pairs, save_random_checkpoint, speedups,
                    step_flops)
from minialign.packing import row_length
from minialign.sampler import global_batches

# Pairs per step: two at the issue's reference point; one where a pair is long or the model big.
BATCH_PAIRS = {("small", 256): 2, ("small", 1024): 2, ("qwen0.5b-4l", 256): 2, ("qwen0.5b-4l", 1024): 1,
               ("qwen0.5b", 256): 1, ("qwen0.5b", 1024): 1, ("small", "hh"): 2, ("qwen0.5b-4l", "hh"): 2,
               ("qwen0.5b", "hh"): 2}
ONE_AT_A_TIME = {"qwen0.5b"}  # shapes whose configurations cannot be resident together


def measure(report, section, shape, kind, seq, items, configs, args, device, dtype, ckpt):
    """configs: {label: worker kwargs with the batches `order` and `packed`}; runs them alternating,
    every round through all of its batches, and reports each with MFU."""
    factory = minialign_steps.dpo_worker if kind == "dpo" else minialign_steps.rm_worker
    pad_id = SHAPES[shape]["pad_token_id"]
    yardstick, res, states = [matmul_flops_per_s(device)], {}, {}
    steps = len(next(iter(configs.values()))["order"]) * args.steps  # per round: every batch, args.steps times
    groups = [[label] for label in configs] if shape in ONE_AT_A_TIME else [list(configs)]
    for group in groups:
        workers = []
        try:
            for label in group:
                workers.append(Worker(label, factory, args.threads, checkpoint=str(ckpt), items=items, pad_id=pad_id,
                                      dtype=dtype, device=str(device), **configs[label]))
            res.update(alternate(workers, args.rounds, steps, warmup_steps=1, device=device, yardstick=yardstick))
            # What gradient checkpointing can shrink: the peak minus the libraries' resident memory
            # and minus the weights, gradients and AdamW moments (the reference's weights for live DPO).
            states.update({w.name: w.info["state_mb"] + w.info["runtime_mb"] for w in workers})
        finally:
            for w in workers:
                w.close()
    matmul = statistics.median(yardstick)
    base = next(iter(configs))
    for label, kw in configs.items():
        m, order, packed = res[label], kw["order"], kw["packed"]
        step_s = m.median_round_s / steps  # the mean step of a round
        flops = [step_flops(SHAPES[shape], batch, kind, LiveReference=not kw.get("precompute_reference"))
                 for batch in make_batches(items, order, pad_id, packed)]
        executed = statistics.mean(f["executed"] for f in flops)  # per step, over the batches of a round
        nominal = statistics.mean(f["nominal"] for f in flops)
        row = dict(name=f"{section}/{kind}/{label}", shape=shape, dtype=dtype, seq=seq, batch_pairs=len(order[0]),
                   layout="packed" if packed else "unpacked", **layout_stats(items, order, packed),
                   pairs_per_s=m.pairs_per_s, tokens_per_s=m.tokens_per_s, step_s=step_s, peak_mb=m.peak_mb,
                   mfu_executed=executed / step_s / matmul, mfu_nominal=nominal / step_s / matmul,
                   matmul_gflops=matmul / 1e9, state_mb=states[label], activations_mb=m.peak_mb - states[label])
        if label != base:  # relative to the first configuration
            b = res[base]
            faster = speedups(m, b)
            row.update(time_vs_first=statistics.median(1 / r for r in faster), speedup=statistics.median(faster),
                       speedup_rounds=[round(r, 3) for r in faster], memory_vs_first=m.peak_mb / b.peak_mb,
                       activations_vs_first=(m.peak_mb - states[label]) / (b.peak_mb - states[base]))
        report.add(**row)


def hh_pool(shape: str, batch_pairs: int, pool_steps: int):
    """The pool of bench_vs_reference's realistic workload (the same seed: the same pairs) and its
    length-grouped batches for each layout, grouped by that layout's row length as train() does;
    None without the shared data."""
    hh = hh_rlhf_pairs()
    if hh is None:
        return None
    n = batch_pairs * pool_steps
    pool = fit_vocabulary(random.Random(0).sample(hh, n), shape)
    orders = {packed: global_batches(n, batch_pairs, seed=0, epoch=0, lengths=[row_length(it, packed) for it in pool],
                                     batches_per_group=pool_steps) for packed in (False, True)}
    return pool, orders


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per round (per batch of the pool for seq hh)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small shape: sequence 256 and a pool of 2 HH steps")
    p.add_argument("--full", action="store_true", help="also checkpointing at 256 and the 24-layer model")
    p.add_argument("--kinds", default="rm,dpo")
    p.add_argument("--batch_pairs", type=int, default=None, help="pairs per step for every entry (default: BATCH_PAIRS)")
    p.add_argument("--layout", choices=["unpacked", "packed"], default="unpacked",
                   help="layout of the random-token sections (ckpt, ref)")
    p.add_argument("--pool_steps", type=int, default=8, help="seq hh: steps per round (pool = this x batch pairs)")
    p.add_argument("--only", default=None, help="run only these plan entries, e.g. qwen0.5b-4l:1024,small:256")
    args = p.parse_args(argv)
    if args.quick:
        args.pool_steps = min(args.pool_steps, 2)
    return args


def bench_plan(args) -> list[tuple]:
    """(shape, seq, sections): "ckpt" = gradient checkpointing off vs on; "ref" = DPO live vs precomputed
    reference; "layout" = two rows vs packed on the HH pairs (seq "hh"). --only picks entries from all."""
    default = [("small", 1024, ("ckpt",)), ("qwen0.5b-4l", 256, ("ref",)), ("qwen0.5b-4l", 1024, ("ckpt",)),
               ("qwen0.5b-4l", "hh", ("layout",))]
    extra = [("small", 256, ("ckpt", "ref")), ("qwen0.5b-4l", 256, ("ckpt",)), ("qwen0.5b", 1024, ("ckpt",)),
             ("small", "hh", ("layout",)), ("qwen0.5b", "hh", ("layout",))]
    if args.only:
        keep = set(args.only.split(","))
        return [entry for entry in default + extra if f"{entry[0]}:{entry[1]}" in keep]
    if args.quick:
        return [("small", 256, ("ckpt", "ref")), ("small", "hh", ("layout",))]
    return default + (extra if args.full else [])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype()
    print("environment:", environment(), flush=True)
    plan = bench_plan(args)
    report = Report(f"minialign training steps ({dtype}, {args.threads} threads; pairs/s and two-row tokens/s: "
                    f"the same work for either layout)")
    packed = args.layout == "packed"
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        for kind in args.kinds.split(","):
            saved = {}
            for shape, seq, sections in plan:
                if shape not in saved:
                    saved[shape] = save_random_checkpoint(shape, f"{tmp}/{kind}-{shape}", reward=kind == "rm")
                ckpt = saved[shape]
                B = args.batch_pairs or BATCH_PAIRS[(shape, seq)]
                if seq == "hh":
                    hh = hh_pool(shape, B, args.pool_steps)
                    if hh is None:
                        print("layout: the HH-RLHF data or the Qwen3 tokenizer is absent under $MINIALIGN_SHARED; skipped")
                        continue
                    pool, orders = hh
                    measure(report, "layout", shape, kind, seq, pool,
                            {"unpacked": {"order": orders[False], "packed": False},
                             "packed": {"order": orders[True], "packed": True}}, args, device, dtype, ckpt)
                    continue
                items, order = random_pairs(shape, B, seq // 2, seq // 2), [list(range(B))]
                one = {"order": order, "packed": packed}
                if "ckpt" in sections:
                    measure(report, "ckpt", shape, kind, seq, items,
                            {"ckpt_off": one, "ckpt_on": {**one, "gradient_checkpointing": True}},
                            args, device, dtype, ckpt)
                if "ref" in sections and kind == "dpo":
                    measure(report, "reference", shape, kind, seq, items,
                            {"live_ref": one, "precomputed_ref": {**one, "precompute_reference": True}},
                            args, device, dtype, ckpt)
            for path in saved.values():
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.table(["name", "shape", "seq", "batch_pairs", "positions_per_pair", "padding", "pairs_per_s", "tokens_per_s",
                  "step_s", "peak_mb", "activations_mb", "mfu_executed", "mfu_nominal", "time_vs_first", "speedup",
                  "memory_vs_first", "activations_vs_first"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
