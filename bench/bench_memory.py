"""Memory per parameter, measured: the bytes every kind of tensor of a DPO training step takes on
one rank, under each data-parallel mode, for a small model on 2 gloo ranks (CPU).

    python bench/bench_memory.py              # about a minute on 2 cores
    python bench/bench_memory.py --shape qwen0.5b-4l

Each mode runs minialign.train.train_step itself (live reference, 2 micro-steps of 2 pairs, AdamW)
twice; probes read the tensors alive at three moments of the second step and sum the bytes of
their storages (untyped_storage().nbytes(), each storage once, a DTensor by its local shard):

    at the optimizer step      weights, gradients, AdamW state, the reducer's buckets, the reference
    between backward passes    gradients held from one micro-step to the next, and every other
                               live tensor (found through the garbage collector: FSDP's unsharded
                               gradients under accumulate_unsharded)
    when backward starts       weight copies that autograd saved in forward for backward, beyond the
                               weights themselves: autocast's bf16 casts, FSDP's gathered root

Each is divided by the trained model's parameter count N (a tied embedding counted once), so
16.0 means four fp32 copies of the model. Activations (batch-dependent) are excluded by design.
Then the measured coefficients are applied to the Qwen2.5 sizes (docs/memory.md).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import socket
import sys
import warnings
from dataclasses import dataclass, replace

import torch
import torch.multiprocessing as mp

from common import SHAPES, Report, environment, make_batches, random_pairs

B, PROMPT, RESPONSE = 2, 17, 23  # pairs per micro-step and lengths; no activation shares a weight's shape
GB = 1e9


@dataclass(frozen=True)
class Mode:
    name: str
    fsdp: bool
    dtype: str
    accumulate_unsharded: bool = False


MODES = [
    Mode("replicated fp32", fsdp=False, dtype="fp32"),
    Mode("replicated bf16 (autocast)", fsdp=False, dtype="bf16"),
    Mode("FSDP2 fp32", fsdp=True, dtype="fp32"),
    Mode("FSDP2 bf16", fsdp=True, dtype="bf16"),
    Mode("FSDP2 bf16, accumulate unsharded", fsdp=True, dtype="bf16", accumulate_unsharded=True),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors (a DTensor by its local shard), each storage once."""
    out = {}
    for t in tensors:
        if t is None:
            continue
        s = local(t).untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def every_live_tensor():
    """Every tensor the garbage collector can reach, with the gradients they carry."""
    with warnings.catch_warnings():  # reading .grad of a non-leaf tensor warns; it is None there
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        return found + [t.grad for t in found if t.grad is not None]


class Probes:
    """What train_step leaves alive at three moments (module docstring), in bytes per category."""

    def __init__(self, policy, reference, optimizer, reducer):
        self.policy, self.reference, self.optimizer, self.reducer = policy, reference, optimizer, reducer
        self.bytes: dict[str, int] = {}
        self.saved: list[torch.Tensor] = []
        self.armed = self.measured_backward_start = False
        # A matmul saves its weight transposed (a view of the same storage): both orientations count.
        self.param_shapes = {s for p in policy.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
        # The stored weights (a sharded model's local shards), before any forward gathers anything.
        self.own = set(storages(policy.parameters())) | set(storages(reference.parameters()))
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.at_optimizer_step())

    def known(self) -> dict[str, dict[int, int]]:
        params = list(self.policy.parameters())
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        buckets = [b.buffer for b in getattr(self.reducer, "buckets", [])]
        return {"weights": storages(params), "grads": storages([p.grad for p in params] + buckets),
                "optimizer": storages(state), "reference": storages(self.reference.parameters())}

    def grad_bytes(self) -> int:
        """The gradients' own bytes (numel x element size), wherever they are stored."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        return sum(local(g).numel() * g.element_size() for g in grads)

    def at_optimizer_step(self):
        if not self.armed:
            return
        k = self.known()
        for name in ("weights", "optimizer", "reference"):
            self.bytes[name] = sum(k[name].values())
        self.bytes["grads"] = self.grad_bytes()
        # What the storage holding the gradients takes beyond them: the reducer's buckets hold
        # one flag per parameter besides the gradients that are views into them.
        self.bytes["reducer_extra"] = sum(k["grads"].values()) - self.bytes["grads"]

    def between_micro_steps(self):
        k = self.known()
        self.bytes["grads_between"] = self.grad_bytes()
        seen = set().union(*k.values())
        self.bytes["other_between"] = sum(v for a, v in storages(every_live_tensor()).items() if a not in seen)

    def pack(self, t):
        if not self.measured_backward_start:
            self.saved.append(t)
        return t

    def unpack(self, t):
        if not self.measured_backward_start and self.saved:
            copies = [s for s in self.saved if tuple(s.shape) in self.param_shapes]
            self.bytes["held_forward_to_backward"] = sum(v for a, v in storages(copies).items() if a not in self.own)
            self.measured_backward_start = True
            self.saved.clear()
        return t


class ProbedSync:
    """The grad_sync train_step receives, measuring before every micro-step but the first."""

    def __init__(self, inner, probes):
        self.inner, self.probes, self.micro = inner, probes, 0

    def set_sync(self, sync):
        if self.micro > 0 and self.probes.armed:
            self.probes.between_micro_steps()
        self.micro += 1
        self.inner.set_sync(sync)

    def wait(self):
        self.inner.wait()

    def clip_grad_norm(self, max_norm):
        return self.inner.clip_grad_norm(max_norm)

    def zero_grad(self):
        self.micro = 0
        self.inner.zero_grad()


def _worker(rank, world, port, shape, mode, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from minialign.config import ModelConfig
    from minialign.distributed import broadcast_parameters, destroy_distributed, init_distributed
    from minialign.dpo import DPOObjective, LiveReference
    from minialign.fsdp import FSDPGradSync, FreeingRootAfter, shard
    from minialign.model import CausalLM
    from minialign.precision import autocast_context, hold_frozen_in_bf16
    from minialign.reducer import GradReducer
    from minialign.train import build_optimizer, train_step

    env = init_distributed(device="cpu")
    cfg = ModelConfig.from_hf_dict(SHAPES[shape])
    torch.manual_seed(0)
    policy = CausalLM(cfg)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    n = sum(p.numel() for p in policy.parameters())
    root = n - sum(p.numel() for layer in policy.model.layers for p in layer.parameters())
    # Linear weights besides a tied head: what hold_frozen_in_bf16 stores in bf16. Matmul weights:
    # every weight autocast casts for a matmul, a tied head (the embedding) included.
    linear = sum(m.weight.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear)
                 and m.weight is not policy.model.embed_tokens.weight)
    matmul = sum(m.weight.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear))
    if mode.fsdp:
        if mode.dtype == "bf16":
            ref.to(torch.bfloat16)
        shard(ref, env, mode.dtype, frozen=True)
        shard(policy, env, mode.dtype)
        inner, reducer = FSDPGradSync(policy, mode.accumulate_unsharded), None
        reference = FreeingRootAfter(LiveReference(ref), ref)
    else:
        broadcast_parameters(policy, env)
        if mode.dtype == "bf16":
            hold_frozen_in_bf16(ref)
        inner = reducer = GradReducer(policy, env)
        reference = LiveReference(ref)
    objective = DPOObjective("sigmoid", 0.1, reference=reference)
    optimizer = build_optimizer(policy, 1e-5, 0.0)
    precision = autocast_context("fp32" if mode.fsdp else mode.dtype, env.device)
    pairs = random_pairs(shape, 4 * world, PROMPT, RESPONSE, seed=0)
    mine = [[(2 * m + rank) * B + i for i in range(B)] for m in range(2)]  # 2 micro-steps of B pairs
    batches = []
    for idx in mine:
        b = make_batches(pairs, [idx], SHAPES[shape]["pad_token_id"])[0]
        batches.append(replace(b, split="train", pair_index=torch.tensor(idx)).to(env.device))
    probes = Probes(policy, ref, optimizer, reducer)
    sync = ProbedSync(inner, probes)
    for step in range(2):  # the second step is measured: AdamW's state exists from the first
        probes.armed = step == 1
        probes.measured_backward_start = step == 0
        probes.saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(probes.pack, probes.unpack):
            train_step(policy, objective, batches, optimizer, sync, 1e-5, 1.0, precision, env)
    queue.put({"rank": rank, "n": n, "linear": linear, "matmul": matmul, "root": root, "bytes": probes.bytes})
    destroy_distributed()


def measure(shape: str, mode: Mode, world: int = 2) -> dict:
    """Per rank bytes of each category (the larger of the ranks) and the model's counts."""
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_worker, args=(world, _free_port(), shape, mode, queue), nprocs=world, start_method="spawn")
    results = [queue.get() for _ in range(world)]
    out = {k: v for k, v in results[0].items() if k not in ("bytes", "rank")}
    out["bytes"] = {k: max(r["bytes"].get(k, 0) for r in results) for k in results[0]["bytes"]}
    return out


# ------------------------------------------------------------------- the Qwen2.5 sizes

# (vocabulary, hidden, intermediate, layers, heads, kv heads, tied embedding) from each model's
# config.json. The model cards give 0.49B, 1.54B, 3.09B, 7.61B, 14.7B and 32.5B parameters; these
# configurations count 0.494B, 1.54B, 3.09B, 7.62B, 14.8B and 32.8B.
QWEN25 = {"0.5B": (151936, 896, 4864, 24, 14, 2, True), "1.5B": (151936, 1536, 8960, 28, 12, 2, True),
          "3B": (151936, 2048, 11008, 36, 16, 2, True), "7B": (152064, 3584, 18944, 28, 28, 4, False),
          "14B": (152064, 5120, 13824, 48, 40, 8, False), "32B": (152064, 5120, 27648, 64, 40, 8, False)}


def qwen25_counts(name: str, reward: bool) -> dict:
    """Parameter counts of a Qwen2.5 size as a reward model (embedding + layers + a 1 x C head) or
    as a DPO policy (causal LM): all (N); linear weights a bf16-held reference stores in bf16 (L);
    weights autocast casts for a matmul (M: L, plus a tied head, the embedding); the root FSDP keeps
    gathered from forward to backward (embedding, final norm, head); one decoder layer."""
    vocab, C, I, layers, H, K, tied = QWEN25[name]
    D = C // H
    layer_linear = C * H * D + 2 * C * K * D + H * D * C + 3 * C * I  # q, k, v, o, gate, up, down
    layer = layer_linear + (H * D + 2 * K * D) + 2 * C  # + q/k/v biases and two norms
    embedding = vocab * C
    head = C if reward else (0 if tied else vocab * C)
    linear = layers * layer_linear + head
    matmul = linear + (embedding if tied and not reward else 0)
    n = layers * layer + embedding + C + head
    return {"N": n, "L": linear, "M": matmul, "root": embedding + C + head, "layer": layer}


def coefficients(results: dict[str, dict]) -> dict:
    """Bytes per parameter of each category, from the measurements, in the units the formula needs."""
    def per(mode, key, unit="n"):
        return results[mode]["bytes"].get(key, 0) / results[mode][unit]

    rep32, rep16, f16 = "replicated fp32", "replicated bf16 (autocast)", "FSDP2 bf16"
    r16 = results[rep16]
    return {
        "replicated_state": sum(per(rep16, k) for k in ("weights", "grads", "reducer_extra", "optimizer")),
        "autocast_copies_per_matmul_weight": per(rep16, "held_forward_to_backward", "matmul"),
        "fp32_reference": per(rep32, "reference"),
        # the bf16-held reference: linear weights in bf16, everything else (embedding, norms, biases) in fp32
        "bf16_reference_per_other": 4.0,
        "bf16_reference_per_linear": (r16["bytes"]["reference"] - 4 * (r16["n"] - r16["linear"])) / r16["linear"],
        "fsdp_state_x_ranks": 2 * sum(per(f16, k) for k in ("weights", "grads", "reducer_extra", "optimizer")),
        "fsdp_reference_x_ranks": 2 * per(f16, "reference"),
        "fsdp_gathered_per_root_param": per(f16, "held_forward_to_backward", "root"),
        "unsharded_accumulation": per("FSDP2 bf16, accumulate unsharded", "other_between"),
    }


def per_gpu_gb(name: str, c: dict, fsdp: bool, kind: str, world: int = 8) -> float:
    """Weights, gradients, optimizer state, weight copies held for backward and the reference on one
    GPU, in GB, activations excluded. kind: "rm", "dpo" (reference precomputed) or "dpo_live"."""
    q = qwen25_counts(name, reward=kind == "rm")
    if not fsdp:
        total = c["replicated_state"] * q["N"] + c["autocast_copies_per_matmul_weight"] * q["M"]
        if kind == "dpo_live":
            total += c["bf16_reference_per_linear"] * q["L"] + c["bf16_reference_per_other"] * (q["N"] - q["L"])
        return total / GB
    total = c["fsdp_state_x_ranks"] * q["N"] / world + c["fsdp_gathered_per_root_param"] * q["root"]
    if kind == "dpo_live":  # its root is gathered too while it runs, then freed (fsdp.FreeingRootAfter)
        total += c["fsdp_reference_x_ranks"] * q["N"] / world + c["fsdp_gathered_per_root_param"] * q["root"]
    return total / GB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--ranks", default="8", help="comma-separated numbers of GPUs to project FSDP2 onto")
    args = p.parse_args(argv)
    print("environment:", environment(), flush=True)
    report = Report(f"bytes per parameter on one rank of 2 (shape {args.shape}; N = trained parameters)")
    results = {}
    for mode in MODES:
        r = measure(args.shape, mode)
        results[mode.name] = r
        b = {k: v / r["n"] for k, v in r["bytes"].items()}
        report.add(name="memory/bytes_per_param", mode=mode.name, params=r["n"], weights=b["weights"],
                   grads=b["grads"], reducer_extra=b.get("reducer_extra", 0.0), optimizer=b["optimizer"],
                   held_fwd_to_bwd=b.get("held_forward_to_backward", 0.0), reference=b["reference"],
                   grads_between=b.get("grads_between", 0.0), other_between=b.get("other_between", 0.0),
                   persistent=b["weights"] + b["grads"] + b.get("reducer_extra", 0.0) + b["optimizer"])
    report.table(["mode", "weights", "grads", "reducer_extra", "optimizer", "held_fwd_to_bwd", "reference",
                  "grads_between", "other_between", "persistent"])
    c = coefficients(results)
    print("\ncoefficients (bytes per parameter):", {k: round(v, 3) for k, v in c.items()}, flush=True)
    kinds = ("rm", "dpo", "dpo_live")
    for world in map(int, args.ranks.split(",")):
        sizes = Report(f"per GPU, GB, bf16, FSDP2 over {world} ranks, activations excluded (measured coefficients)")
        for name in QWEN25:
            sizes.add(name="memory/qwen2.5", size=name, params_b=qwen25_counts(name, reward=False)["N"] / 1e9,
                      layer_b=qwen25_counts(name, reward=False)["layer"] / 1e9, fsdp_ranks=world,
                      **{f"ddp_{k}": per_gpu_gb(name, c, False, k) for k in kinds},
                      **{f"fsdp_{k}": per_gpu_gb(name, c, True, k, world) for k in kinds})
        sizes.table(["size", "params_b", "layer_b", *(f"ddp_{k}" for k in kinds), *(f"fsdp_{k}" for k in kinds)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
