"""minialign's RM and DPO training steps: throughput, peak memory, MFU, gradient checkpointing,
live versus precomputed reference log-probs.

    python bench/bench_train.py            # the targets: Qwen2.5-0.5B shape with 4 layers, + small at 1024
    python bench/bench_train.py --quick    # small shape, sequence 256 (a smoke test)
    python bench/bench_train.py --full     # adds small and 0.5B-4L checkpointing at 256, the full 24 layers
    python bench/bench_train.py --only qwen0.5b:1024   # just the 24-layer checkpointing comparison
    python bench/bench_train.py --only qwen0.5b:1024 --kinds rm --batch_pairs 2 --rounds 1   # a bigger batch

Each comparison runs its two configurations in two processes that alternate rounds
(common.alternate): peak memory is each process's own (RSS on CPU, max allocated on GPU).
The 24-layer model is the exception: two of its processes do not fit in 24 GB together, so its
configurations run one after the other, each alone in memory.
Data: random tokens, prompt = response = seq/2 per row (every answer ends with EOS), B pairs
per step = 2B rows of seq tokens, no padding. fp32 on CPU, bf16 autocast on GPU.

MFU = achieved matmul FLOP/s of the step / the machine's dense matmul FLOP/s, measured in the
same run between rounds with a large torch.matmul (common.matmul_flops_per_s). Two FLOP counts
(common.step_flops): "nominal" (6 x params x tokens, + 2 x for the reference, vocab projection
at every position) and "executed" (the vocabulary projection only where a label is). Recomputed
forwards under gradient checkpointing are not counted (standard MFU).

activations_mb = peak - the libraries' resident memory (measured in the worker before any model
exists) - the weights, gradients and AdamW moments (+ the reference's weights for live DPO): the
memory that depends on the batch (activations, logits, temporaries), which is what gradient
checkpointing can shrink.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile

import torch

import minialign_steps
from common import (SHAPES, Report, Worker, alternate, device_and_dtype, environment, make_batches,
                    matmul_flops_per_s, random_pairs, save_random_checkpoint, step_flops)

# Pairs per step: two at the issue's reference point; one where a pair is long or the model big.
BATCH_PAIRS = {("small", 256): 2, ("small", 1024): 2, ("qwen0.5b-4l", 256): 2, ("qwen0.5b-4l", 1024): 1,
               ("qwen0.5b", 256): 1, ("qwen0.5b", 1024): 1}
ONE_AT_A_TIME = {"qwen0.5b"}  # shapes whose configurations cannot be resident together


def measure(report, section, shape, kind, seq, configs, args, device, dtype, ckpt):
    """configs: {label: worker kwargs}; runs them alternating and reports each with MFU."""
    B = args.batch_pairs or BATCH_PAIRS[(shape, seq)]
    items = random_pairs(shape, B, seq // 2, seq // 2)
    batches = make_batches(items, [list(range(B))], SHAPES[shape]["pad_token_id"])
    factory = minialign_steps.dpo_worker if kind == "dpo" else minialign_steps.rm_worker
    yardstick, res, states = [matmul_flops_per_s(device)], {}, {}
    groups = [[label] for label in configs] if shape in ONE_AT_A_TIME else [list(configs)]
    for group in groups:
        workers = []
        try:
            for label in group:
                workers.append(Worker(label, factory, args.threads, checkpoint=str(ckpt), batches=batches,
                                      dtype=dtype, device=str(device), **configs[label]))
            res.update(alternate(workers, args.rounds, args.steps, warmup_steps=1, device=device,
                                 yardstick=yardstick))
            # What gradient checkpointing can shrink: the peak minus the libraries' resident memory
            # and minus the weights, gradients and AdamW moments (the reference's weights for live DPO).
            states.update({w.name: w.info["state_mb"] + w.info["runtime_mb"] for w in workers})
        finally:
            for w in workers:
                w.close()
    matmul = statistics.median(yardstick)
    base = next(iter(configs))
    for label, kw in configs.items():
        m = res[label]
        flops = step_flops(SHAPES[shape], batches[0], kind, live_reference=not kw.get("precompute_reference"))
        row = dict(name=f"{section}/{kind}/{label}", shape=shape, dtype=dtype, seq=seq, batch_pairs=B,
                   tokens_per_s=m.tokens_per_s, step_s=m.median_step_s, peak_mb=m.peak_mb,
                   mfu_executed=flops["executed"] / m.median_step_s / matmul,
                   mfu_nominal=flops["nominal"] / m.median_step_s / matmul, matmul_gflops=matmul / 1e9,
                   state_mb=states[label], activations_mb=m.peak_mb - states[label])
        if label != base:  # relative to the first configuration
            b = res[base]
            row.update(time_vs_first=m.median_step_s / b.median_step_s, memory_vs_first=m.peak_mb / b.peak_mb,
                       activations_vs_first=(m.peak_mb - states[label]) / (b.peak_mb - states[base]))
        report.add(**row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small shape at sequence 256 only")
    p.add_argument("--full", action="store_true", help="also checkpointing at 256 and the 24-layer model")
    p.add_argument("--kinds", default="rm,dpo")
    p.add_argument("--batch_pairs", type=int, default=None, help="pairs per step for every entry (default: BATCH_PAIRS)")
    p.add_argument("--only", default=None, help="run only these plan entries, e.g. qwen0.5b-4l:1024,small:256")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype()
    print("environment:", environment(), flush=True)

    # (shape, seq, sections): "ckpt" = gradient checkpointing off vs on; "ref" = DPO live vs precomputed
    # reference. --only picks entries from all of them.
    default = [("small", 1024, ("ckpt",)), ("qwen0.5b-4l", 256, ("ref",)), ("qwen0.5b-4l", 1024, ("ckpt",))]
    extra = [("small", 256, ("ckpt", "ref")), ("qwen0.5b-4l", 256, ("ckpt",)), ("qwen0.5b", 1024, ("ckpt",))]
    if args.only:
        keep = set(args.only.split(","))
        plan = [entry for entry in default + extra if f"{entry[0]}:{entry[1]}" in keep]
    elif args.quick:
        plan = [("small", 256, ("ckpt", "ref"))]
    else:
        plan = default + (extra if args.full else [])
    report = Report(f"minialign training steps ({dtype}, {args.threads} threads)")
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        for kind in args.kinds.split(","):
            saved = {}
            for shape, seq, sections in plan:
                if shape not in saved:
                    saved[shape] = save_random_checkpoint(shape, f"{tmp}/{kind}-{shape}", reward=kind == "rm")
                ckpt = saved[shape]
                if "ckpt" in sections:
                    measure(report, "ckpt", shape, kind, seq,
                            {"ckpt_off": {}, "ckpt_on": {"gradient_checkpointing": True}},
                            args, device, dtype, ckpt)
                if "ref" in sections and kind == "dpo":
                    measure(report, "reference", shape, kind, seq,
                            {"live_ref": {}, "precomputed_ref": {"precompute_reference": True}},
                            args, device, dtype, ckpt)
            for path in saved.values():
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.table(["name", "shape", "seq", "batch_pairs", "tokens_per_s", "step_s", "peak_mb", "activations_mb",
                  "mfu_executed", "mfu_nominal", "time_vs_first", "memory_vs_first", "activations_vs_first"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
