"""Where one minialign training step spends its time: the torch profiler's table of operators.

    python bench/profile_step.py --kind rm --shape qwen0.5b --seq 1024     # 24 layers, ~2 min
    python bench/profile_step.py --kind dpo --shape qwen0.5b-4l --seq 256 --pairs 2
    python bench/profile_step.py --kind dpo --data hh --layout packed      # a median HH-RLHF batch, packed

The step is the benchmark's (minialign_steps.build_step: forward, backward, clipping, AdamW;
DPO with the reference live), after one warm-up step, fp32 on CPU, on
  --data random  random tokens, prompt = response = seq/2, in the two-row layout unless --layout packed;
  --data hh      the HH-RLHF harmless pairs as minialign trains on them: the --pairs pairs around
                 the median length (the packed row's), so a typical length-grouped batch.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

import minialign_steps
from common import SHAPES, fit_vocabulary, hh_rlhf_pairs, layout_stats, random_pairs, save_random_checkpoint
from minialign.packing import packed_length


def median_pairs(shape: str, n: int):
    """n HH-RLHF pairs at the middle of the length distribution, or None without the shared data."""
    hh = hh_rlhf_pairs()
    if hh is None:
        return None
    hh = sorted(hh, key=packed_length)
    mid = len(hh) // 2 - n // 2
    return fit_vocabulary(hh[mid:mid + n], shape)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["rm", "dpo"], default="rm")
    p.add_argument("--shape", choices=list(SHAPES), default="qwen0.5b-4l")
    p.add_argument("--data", choices=["random", "hh"], default="random")
    p.add_argument("--layout", choices=["unpacked", "packed"], default="unpacked")
    p.add_argument("--seq", type=int, default=1024, help="random: tokens per row, half prompt and half answer")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default 1 random, 2 hh)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=22, help="operators to list")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = args.pairs or (2 if args.data == "hh" else 1)
    if args.data == "hh":
        items = median_pairs(args.shape, pairs)
        if items is None:
            print("the HH-RLHF data or the Qwen3 tokenizer is absent under $MINIALIGN_SHARED")
            return 2
    else:
        items = random_pairs(args.shape, pairs, args.seq // 2, args.seq // 2)
    packed, order = args.layout == "packed", [list(range(pairs))]
    tmp = tempfile.mkdtemp(prefix="bench_profile_")
    try:
        ckpt = str(save_random_checkpoint(args.shape, f"{tmp}/model", reward=args.kind == "rm"))
        step, _ = minialign_steps.build_step(args.kind, ckpt, items, order, SHAPES[args.shape]["pad_token_id"], "fp32",
                                             torch.device("cpu"), packed=packed)
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = layout_stats(items, order, packed)
    print(f"{args.kind} step, {args.shape}, {args.data} data, {args.layout}, {pairs} pair(s), "
          f"{stats['positions_per_pair']:.0f} positions per pair (padding {stats['padding']:.1%}): "
          f"{seconds:.2f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
