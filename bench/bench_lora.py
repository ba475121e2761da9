"""LoRA (minialign/lora.py) against full fine-tuning: bytes per parameter, measured, and what they
make of the Qwen2.5 sizes on one GPU; then peak memory and step time of a LoRA DPO step against a
full DPO step at the Qwen2.5-0.5B shape with 4 layers.

    python bench/bench_lora.py                      # both parts, a few minutes on 2 cores
    python bench/bench_lora.py --part bytes         # the bytes per parameter only (seconds)
    python bench/bench_lora.py --part step --rounds 3 --steps 2

Bytes (one process, the `small` shape of bench_memory.py, DPO with the adapter-off live reference,
2 micro-steps, AdamW, each dtype): the probes of bench_memory.py read the tensors alive at the
optimizer step and the weight copies autograd holds from forward to backward, each storage once:

    frozen base   bytes of the frozen tensors, split into the linear weights (L, held in bf16
                  under bf16: lora.hold_base_in_bf16) and the rest (embedding, norms, biases: fp32)
    adapters      weights, gradients and AdamW state of the T trained parameters (fp32)
    held          weight copies autograd keeps for backward: autocast's bf16 casts of the
                  adapters and of a tied head (the fp32 embedding); none of the bf16 base

Then per GPU, activations excluded, with the measured coefficients and T of rank --rank on the seven
projections (a replicated copy per GPU: LoRA's state is small enough that sharding does not pay):

    LoRA, bf16:   b_L L + b_other (N - L) + b_T T + held         (DPO: the reference is free)

Step (two worker processes alternating rounds, common.alternate; peak RSS each; fp32 on CPU, the
rule of bench_train.py): full DPO (policy + live fp32 reference, AdamW on every weight) against
LoRA DPO (one model, adapters only), the same pairs, both through minialign.train.train_step.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace

import torch

import minialign_steps
from bench_memory import QWEN25, ProbedSync, Probes, qwen25_counts, storages
from common import SHAPES, Report, Worker, alternate, environment, make_batches, random_pairs, save_random_checkpoint

from minialign.config import ModelConfig
from minialign.distributed import DistEnv
from minialign.dpo import AdapterOffReference, DPOObjective
from minialign.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, hold_base_in_bf16
from minialign.model import CausalLM
from minialign.precision import autocast_context
from minialign.reducer import GradReducer
from minialign.train import build_optimizer, train_step

GB = 1e9
B, PROMPT, RESPONSE = 2, 17, 23  # as bench_memory.py: no activation shares a weight's shape


def lora_trained(name: str, rank: int, reward: bool) -> int:
    """T: adapter parameters of a Qwen2.5 size with rank-r adapters on the seven projections,
    r (I + O) per matrix (+ the reward head's C)."""
    vocab, C, I, layers, H, K, tied = QWEN25[name]
    D = C // H
    shapes = [(C, H * D), (C, K * D), (C, K * D), (H * D, C), (C, I), (C, I), (I, C)]  # (in, out): q k v o gate up down
    return layers * sum(rank * (i + o) for i, o in shapes) + (C if reward else 0)


def measure_bytes(shape: str, dtype: str, rank: int) -> dict:
    """Bytes of each category at the second DPO step of a LoRA model (module docstring)."""
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    policy = apply_lora(CausalLM(ModelConfig.from_hf_dict(SHAPES[shape])), LoRAConfig(rank=rank))
    if dtype == "bf16":
        hold_base_in_bf16(policy)
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    trained = [p for p in policy.parameters() if p.requires_grad]
    embedding = policy.model.embed_tokens.weight
    linear = [m.weight for m in policy.modules() if hasattr(m, "in_features") and m.weight is not embedding]
    linear_ids = {id(w) for w in linear}
    objective = DPOObjective("sigmoid", 0.1, reference=AdapterOffReference(policy))
    optimizer = build_optimizer(policy, 1e-5, 0.0)
    reducer = GradReducer(policy, env)
    probes = Probes(policy, torch.nn.Module(), optimizer, reducer)
    sync = ProbedSync(reducer, probes)
    pairs = random_pairs(shape, 2 * B, PROMPT, RESPONSE, seed=0)
    batches = []
    for idx in ([0, 1], [2, 3]):
        b = make_batches(pairs, [idx], SHAPES[shape]["pad_token_id"])[0]
        batches.append(replace(b, split="train", pair_index=torch.tensor(idx)).to(env.device))
    for step in range(2):  # the second step is measured: AdamW's state exists from the first
        probes.armed, probes.measured_backward_start = step == 1, step == 0
        probes.saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(probes.pack, probes.unpack):
            train_step(policy, objective, batches, optimizer, sync, 1e-5, 1.0, autocast_context(dtype, env.device), env)
    n_linear = sum(p.numel() for p in frozen if id(p) in linear_ids)
    return {"N": sum(p.numel() for p in policy.parameters()), "L": n_linear, "T": sum(p.numel() for p in trained),
            "tied_head": embedding.numel() if policy.config.tie_word_embeddings else 0,
            "base_linear": sum(storages([p for p in frozen if id(p) in linear_ids]).values()),
            "base_other": sum(storages([p for p in frozen if id(p) not in linear_ids]).values()),
            "adapters": sum(storages(trained).values()), "grads": probes.bytes["grads"],
            "optimizer": probes.bytes["optimizer"], "held": probes.bytes.get("held_forward_to_backward", 0)}


def bytes_part(shape: str, rank: int) -> None:
    report = Report(f"LoRA r {rank}: bytes per parameter, DPO, one process (shape {shape}; N parameters, "
                    "L frozen linear weights, T trained)")
    coeffs = {}
    for dtype in ("fp32", "bf16"):
        m = measure_bytes(shape, dtype, rank)
        held_per = m["held"] / (m["T"] + m["tied_head"]) if dtype == "bf16" else m["held"] / max(m["T"], 1)
        row = {"dtype": dtype, "N": m["N"], "L": m["L"], "T": m["T"], "T_share": m["T"] / m["N"],
               "base_per_linear": m["base_linear"] / m["L"],
               "base_per_other": m["base_other"] / (m["N"] - m["L"] - m["T"]),
               "adapter_w_per_T": m["adapters"] / m["T"], "grads_per_T": m["grads"] / m["T"],
               "adamw_per_T": m["optimizer"] / m["T"], "held_per_T_plus_tied_head": held_per}
        report.add(name="lora/bytes_per_param", **row)
        coeffs[dtype] = row
    report.table(["dtype", "N", "T", "T_share", "base_per_linear", "base_per_other", "adapter_w_per_T", "grads_per_T",
                  "adamw_per_T", "held_per_T_plus_tied_head"])
    c = coeffs["bf16"]
    per_T = c["adapter_w_per_T"] + c["grads_per_T"] + c["adamw_per_T"]
    sizes = Report(f"per GPU, GB, bf16, LoRA r {rank} on {','.join(DEFAULT_TARGETS)}, activations excluded "
                   "(measured coefficients; full fine-tuning replicated: docs/memory.md)")
    for name in QWEN25:
        for kind in ("rm", "dpo"):
            q = qwen25_counts(name, reward=kind == "rm")
            T = lora_trained(name, rank, reward=kind == "rm")
            head = QWEN25[name][1] if kind == "rm" else 0  # the reward head (C): trained, in T, not in the base
            tied_head = q["M"] - q["L"]  # the embedding, when it is the head (autocast copies it)
            gb = (c["base_per_linear"] * (q["L"] - head) + c["base_per_other"] * (q["N"] - q["L"]) + per_T * T
                  + c["held_per_T_plus_tied_head"] * (T + tied_head)) / GB
            sizes.add(name="lora/qwen2.5", size=name, kind=kind, params_b=q["N"] / 1e9, trained_m=T / 1e6,
                      trained_share=T / q["N"], per_gpu_gb=gb)
    sizes.table(["size", "kind", "params_b", "trained_m", "trained_share", "per_gpu_gb"])


def step_part(shape: str, rank: int, seq: int, rounds: int, steps: int, threads: int) -> None:
    """Full DPO vs LoRA DPO, alternating rounds in two processes (module docstring)."""
    tmp = tempfile.mkdtemp(prefix="bench_lora_")
    try:
        checkpoint = save_random_checkpoint(shape, f"{tmp}/model")
        items = random_pairs(shape, 2 * B, seq // 2, seq // 2, seed=0)
        order = [[0, 1], [2, 3]]
        pad = SHAPES[shape]["pad_token_id"]
        common = dict(checkpoint=checkpoint, items=items, order=order, pad_id=pad, dtype="fp32", device="cpu",
                      packed=False)
        workers = [Worker("full DPO", minialign_steps.dpo_worker, threads, **common),
                   Worker(f"LoRA r {rank} DPO", minialign_steps.dpo_worker, threads, **common, lora_rank=rank)]
        try:
            result = alternate(workers, rounds, steps)
        finally:
            for w in workers:
                w.close()
        report = Report(f"DPO step, shape {shape}, {B} pairs x 2 rows x {seq} tokens, fp32 on CPU "
                        f"({threads} threads per worker, the CPU shared with other jobs)")
        full = result["full DPO"]
        for w in workers:
            m = result[w.name]
            report.add(name="lora/step", config=w.name, step_s=m.median_step_s, pairs_per_s=m.pairs_per_s,
                       peak_mb=m.peak_mb, state_mb=w.info["state_mb"], runtime_mb=w.info["runtime_mb"],
                       time_vs_full=statistics.median([b / a for a, b in zip(full.round_s, m.round_s)]))
        report.table(["config", "step_s", "pairs_per_s", "peak_mb", "state_mb", "runtime_mb", "time_vs_full"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=("all", "bytes", "step"))
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--bytes_shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--step_shape", default="qwen0.5b-4l", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=256, help="tokens per row in the step part")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per worker per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)
    print("environment:", environment(), flush=True)
    if args.part in ("all", "bytes"):
        bytes_part(args.bytes_shape, args.rank)
    if args.part in ("all", "step"):
        step_part(args.step_shape, args.rank, args.seq, args.rounds, args.steps, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
