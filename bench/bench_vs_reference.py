"""minialign's RM and DPO training throughput against TRL and a plain transformers loop, with
prefix sharing (one packed row per pair, the trainers' default) and without (two rows per pair).

    /work/refenv/bin/python bench/bench_vs_reference.py            # fixed lengths + HH-RLHF lengths
    /work/refenv/bin/python bench/bench_vs_reference.py --quick    # small shape, fewer rounds, fixed lengths
    /work/refenv/bin/python bench/bench_vs_reference.py --quick --workloads realistic   # smoke test of the HH path
    python bench/bench_vs_reference.py                             # no transformers/trl: says so, exits

Two workloads, each measured with the implementations alternating rounds in one run
(common.alternate), each in its own process, all on the same random-initialised checkpoint.
Per reference, three processes are alive together: minialign packed, minialign unpacked and the
reference (--layouts packed drops the unpacked one where memory is short).
  fixed      B pairs of prompt 128 + response 128 tokens per step (the issue's shape: 2 pairs x 256)
  realistic  the HH-RLHF harmless-base pairs, tokenized as minialign trains on them. Every round
             each implementation trains on the same pool of pairs: TRL in random batches (its
             default order), minialign in length-grouped batches (sampler.global_batches(lengths=),
             grouped by the length of its layout's rows, as train() groups them).
Work is counted in pairs, the same for every side (common.py): pairs/s, and tokens/s = the
non-pad tokens of those pairs in the two-row layout per second (what TRL computes; minialign
packed computes fewer positions for the same pairs and is credited with the same tokens). A
round's rate is its work over its seconds; the figure is the median over rounds after a warm-up
step; a ratio is the median of the per-round ratios (the same pairs in every round, so it is the
ratio of times). positions_per_pair: the padded slots a layout makes the model compute per pair.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile

import torch

from common import (LAYOUTS, SHAPES, Report, Worker, alternate, device_and_dtype, environment, fit_vocabulary,
                    hh_rlhf_pairs, layout_stats, make_batches, random_pairs, save_random_checkpoint, speedups,
                    two_row_tokens)
from minialign.packing import row_length
from minialign.sampler import global_batches


def have_references() -> bool:
    try:
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def compare(report, kind, shape, ckpt, items, ml_orders, ref_order, args, device, dtype, workload):
    """minialign in each layout of ml_orders ({layout: batches}) against TRL, then against the
    transformers loop, alternating rounds; the references train on the batches ref_order."""
    import minialign_steps
    import reference_steps

    cfg = SHAPES[shape]
    common = dict(dtype=dtype, device=str(device))
    ml_factory = minialign_steps.dpo_worker if kind == "dpo" else minialign_steps.rm_worker
    trl_factory = reference_steps.trl_dpo_worker if kind == "dpo" else reference_steps.trl_rm_worker
    hf_factory = reference_steps.hf_loop_dpo_worker if kind == "dpo" else reference_steps.hf_loop_rm_worker
    work_per_step = [(len(idx), two_row_tokens([items[i] for i in idx])) for idx in ref_order]
    opponents = {
        "trl": lambda: Worker("trl", trl_factory, args.threads, checkpoint=str(ckpt), items=items, order=ref_order,
                              vocab_size=cfg["vocab_size"], pad_id=cfg["pad_token_id"], eos_id=cfg["eos_token_id"],
                              work_per_step=work_per_step, **common),
        "transformers_loop": lambda: Worker("transformers_loop", hf_factory, args.threads, checkpoint=str(ckpt),
                                            batches=make_batches(items, ref_order, cfg["pad_token_id"]), **common),
    }
    stats = {layout: layout_stats(items, order, layout == "packed") for layout, order in ml_orders.items()}
    ref_stats = layout_stats(items, ref_order, packed=False)
    realistic = workload == "realistic"
    steps = len(ref_order) if realistic else args.steps  # realistic: every round trains on the whole pool
    for ref_name in args.references.split(","):
        workers = []
        try:
            for layout, order in ml_orders.items():
                workers.append(Worker(f"minialign_{layout}", ml_factory, args.threads, checkpoint=str(ckpt), items=items,
                                      order=order, pad_id=cfg["pad_token_id"], packed=layout == "packed", **common))
            workers.append(opponents[ref_name]())
            res = alternate(workers, args.rounds, steps, warmup_steps=1, device=device)
        finally:
            for w in workers:
                w.close()
        ref = res[ref_name]
        rows = [(f"minialign_{layout}", layout, stats[layout], "length-grouped" if realistic else "fixed")
                for layout in ml_orders]
        rows.append((ref_name, "unpacked", ref_stats, "random" if realistic else "fixed"))
        for name, layout, st, order in rows:
            m = res[name]
            row = dict(name=f"{kind}/{workload}/{name}", vs=ref_name, shape=shape, dtype=dtype,
                       batch_pairs=len(ref_order[0]), layout=layout, order=order, **st, pairs_per_s=m.pairs_per_s,
                       tokens_per_s=m.tokens_per_s, step_s=m.median_round_s / steps, peak_mb=m.peak_mb)
            if m is not ref:
                ratios = speedups(m, ref)
                row.update(ratio=statistics.median(ratios), ratio_rounds=[round(r, 3) for r in ratios])
            if layout == "packed" and "minialign_unpacked" in res:
                ratios = speedups(m, res["minialign_unpacked"])
                row.update(vs_unpacked=statistics.median(ratios), vs_unpacked_rounds=[round(r, 3) for r in ratios])
            report.add(**row)


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
    p.add_argument("--workloads", default=None, help="fixed,realistic (default both; --quick: fixed)")
    p.add_argument("--kinds", default="dpo,rm")
    p.add_argument("--references", default="trl,transformers_loop")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="minialign's layouts: packed,unpacked")
    p.add_argument("--quick", action="store_true", help="small shape, 2 rounds, a pool of 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.pool_steps = "small", 2, 2
        args.workloads = args.workloads or "fixed"
    args.workloads = args.workloads or "fixed,realistic"
    layouts = args.layouts.split(",")
    if not layouts or set(layouts) - set(LAYOUTS):
        p.error(f"--layouts takes {' and/or '.join(LAYOUTS)}, got {args.layouts!r}")
    torch.set_num_threads(args.threads)
    print("environment:", environment(), flush=True)
    if not have_references():
        print("transformers and trl are not installed: nothing to compare against (run with /work/refenv/bin/python)")
        return 0
    device, dtype = device_and_dtype()
    report = Report(f"minialign vs references ({args.shape}, {dtype}, {args.threads} threads; "
                    f"pairs/s and two-row tokens/s: the same work for every side)")
    hh = hh_rlhf_pairs() if "realistic" in args.workloads else None
    if "realistic" in args.workloads and hh is None:
        print("realistic: the HH-RLHF data or the Qwen3 tokenizer is absent under $MINIALIGN_SHARED; skipped")
    tmp = tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        for kind in args.kinds.split(","):
            ckpt = save_random_checkpoint(args.shape, f"{tmp}/{kind}", reward=kind == "rm")
            if "fixed" in args.workloads:
                n = args.batch_pairs * max(args.steps, 1)
                items = random_pairs(args.shape, n, args.prompt_len, args.response_len)
                order = [list(range(i, i + args.batch_pairs)) for i in range(0, n, args.batch_pairs)]
                compare(report, kind, args.shape, ckpt, items, {layout: order for layout in layouts}, order, args,
                        device, dtype, "fixed")
            if hh is not None:
                n = args.batch_pairs * args.pool_steps
                pool = fit_vocabulary(random.Random(0).sample(hh, n), args.shape)  # the same pairs for every side
                grouped = {layout: global_batches(n, args.batch_pairs, seed=0, epoch=0,
                                                  lengths=[row_length(it, layout == "packed") for it in pool],
                                                  batches_per_group=args.pool_steps) for layout in layouts}
                shuffled = global_batches(n, args.batch_pairs, seed=0, epoch=0)
                compare(report, kind, args.shape, ckpt, pool, grouped, shuffled, args, device, dtype, "realistic")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.table(["name", "vs", "order", "positions_per_pair", "padding", "pairs_per_s", "tokens_per_s", "step_s",
                  "peak_mb", "ratio", "vs_unpacked"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
