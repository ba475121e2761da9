"""Where one minialign training step spends its time: the torch profiler's table of operators.

    python bench/profile_step.py --kind rm --shape qwen0.5b --seq 1024     # 24 layers, ~2 min
    python bench/profile_step.py --kind dpo --shape qwen0.5b-4l --seq 256 --pairs 2

The step is the benchmark's (minialign_steps.build_step: forward, backward, clipping, AdamW;
DPO with the reference live), on random tokens (prompt = response = seq/2), after one
warm-up step. fp32 on CPU.
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
from common import SHAPES, make_batches, random_pairs, save_random_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["rm", "dpo"], default="rm")
    p.add_argument("--shape", choices=list(SHAPES), default="qwen0.5b-4l")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=22, help="operators to list")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench_profile_")
    try:
        ckpt = str(save_random_checkpoint(args.shape, f"{tmp}/model", reward=args.kind == "rm"))
        items = random_pairs(args.shape, args.pairs, args.seq // 2, args.seq // 2)
        batches = make_batches(items, [list(range(args.pairs))], SHAPES[args.shape]["pad_token_id"])
        step, _ = minialign_steps.build_step(args.kind, ckpt, batches, "fp32", torch.device("cpu"))
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.kind} step, {args.shape}, {args.pairs} pair(s) x {args.seq} tokens: {seconds:.2f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
