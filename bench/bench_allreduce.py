"""How much of the gradient all-reduce hides behind backward: 2 ranks (gloo on CPU, or NCCL on
2 GPUs with --device cuda), bench/instrumented_reducer.InstrumentedGradReducer with overlap=True against
overlap=False.

    python bench/bench_allreduce.py                        # small shape and the Qwen2.5-0.5B shape with 4 layers
    python bench/bench_allreduce.py --quick                # small shape only
    python bench/bench_allreduce.py --device cuda          # 2 GPUs, NCCL, bf16 autocast

Each rank runs a reward-model step (forward, backward, reducer.wait()) on its own batch, with
one thread per rank (2 ranks share the 2 cores). Rounds alternate between a reducer that
launches each bucket from a gradient hook during backward (overlap) and one that launches
every bucket inside wait() (nothing hidden); each setting has its own copy of the model, since a
reducer's hooks and bucket views stay with the parameters it was built on. wait_s is the time left blocked in wait():
    hidden = 1 - wait_s(overlap) / wait_s(no overlap)
step_saving_s compares backward + wait of the two settings (communication during backward can
also slow backward down). Caveat: gloo on one host uses the same cores as backward, so communication here competes
with compute instead of running on a separate network engine as on GPUs.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from common import SHAPES, Report, environment, make_batches, random_pairs, sync


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, shape, rounds, steps, bucket_mb, device, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from minialign.config import ModelConfig
    from minialign.distributed import broadcast_parameters, destroy_distributed, init_distributed
    from minialign.model import RewardModel
    from instrumented_reducer import InstrumentedGradReducer  # bench/
    from minialign.precision import autocast_context

    env = init_distributed(device=device)
    cfg = SHAPES[shape]
    batch = make_batches(random_pairs(shape, 2, 128, 128, seed=rank), [[0, 1]], cfg["pad_token_id"])[0].to(env.device)
    precision = autocast_context("bf16" if env.device.type == "cuda" else "fp32", env.device)
    models, reducers = {}, {}
    for overlap in (True, False):  # one copy of the model per setting (module docstring)
        torch.manual_seed(0)
        models[overlap] = RewardModel(ModelConfig.from_hf_dict(cfg)).to(env.device)
        broadcast_parameters(models[overlap], env)
        reducers[overlap] = InstrumentedGradReducer(models[overlap], env, bucket_mb=bucket_mb, overlap=overlap,
                                                    timing=True)
    grad_mb = sum(p.numel() * p.element_size() for p in models[True].parameters()) / 2**20
    results = {setting: {"wait": [], "backward": [], "in_backward": 0} for setting in (True, False)}
    for r in range(rounds + 1):  # round 0 warms up
        for overlap in (True, False) if r % 2 == 0 else (False, True):
            model, reducer = models[overlap], reducers[overlap]
            for _ in range(steps):
                with precision:
                    rewards = model(batch.input_ids, batch.attention_mask)
                loss = -torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:]).mean()
                sync(env.device)
                t = time.perf_counter()
                before = reducer.buckets_in_backward
                loss.backward()
                sync(env.device)
                backward_s = time.perf_counter() - t
                reducer.wait()
                reducer.zero_grad()  # keeps the gradients as views into the buckets
                if r > 0:
                    results[overlap]["wait"].append(reducer.last_wait_s)
                    results[overlap]["backward"].append(backward_s)
                    results[overlap]["in_backward"] = reducer.buckets_in_backward - before
            results[overlap]["buckets"] = len(reducer.buckets)
    if rank == 0:
        queue.put({"grad_mb": grad_mb, "results": results})
    destroy_distributed()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,qwen0.5b-4l")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="steps per round and setting")
    p.add_argument("--bucket_mb", type=float, default=25.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: 2 GPUs, NCCL, bf16 autocast")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = "small"
    print("environment:", environment(), flush=True)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print("--device cuda needs 2 GPUs", file=sys.stderr)
        return 2
    backend = "2 NCCL ranks on 2 GPUs, bf16 autocast" if args.device == "cuda" else "2 gloo ranks, 1 thread each"
    report = Report(f"gradient all-reduce hidden behind backward ({backend})")
    ctx = mp.get_context("spawn")
    for shape in args.shapes.split(","):
        queue = ctx.Queue()
        mp.start_processes(_rank, args=(2, _free_port(), shape, args.rounds, args.steps, args.bucket_mb, args.device,
                                        queue),
                           nprocs=2, start_method="spawn")
        out = queue.get()
        on, off = out["results"][True], out["results"][False]
        wait_on, wait_off = statistics.median(on["wait"]), statistics.median(off["wait"])
        report.add(name="allreduce/overlap", shape=shape, grad_mb=out["grad_mb"], buckets=on["buckets"],
                   buckets_launched_in_backward=on["in_backward"],
                   backward_s=statistics.median(on["backward"]), wait_s=wait_on,
                   wait_s_no_overlap=wait_off, backward_s_no_overlap=statistics.median(off["backward"]),
                   hidden=1 - wait_on / wait_off if wait_off > 0 else None,
                   step_saving_s=(statistics.median(off["backward"]) + wait_off) - (statistics.median(on["backward"]) + wait_on))
    report.table(["name", "shape", "grad_mb", "buckets", "buckets_launched_in_backward", "backward_s", "wait_s",
                  "backward_s_no_overlap", "wait_s_no_overlap", "hidden", "step_saving_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
