"""Fully sharded data parallel on torch's FSDP2, for models whose replicated copies do not fit (--fsdp).

Data parallel by hand (distributed.py) keeps the whole model on every rank: weights, gradients
and AdamW's two moments, 16 bytes per parameter in fp32, plus a bf16 copy of the weights under
autocast (docs/memory.md). FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/W of
each on each of W ranks: every parameter becomes a DTensor cut along dim 0, and

    before a layer's forward      all-gather its parameters; free them again after its forward
    in backward                   all-gather them again, compute, reduce-scatter the gradients:
                                  each rank receives the mean over ranks of its own shard
    optimizer step                AdamW on the local shards (its moments are sharded too)

The gradient is the same mean over ranks that GradReducer computes (SUM / W, distributed.py), so
train.train_step runs unchanged: FSDPGradSync offers GradReducer's four methods. Hand-written
data parallel stays the default and the one to read; FSDP2 is torch's engine for sharding.

Precision under --dtype bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). The fp32
shards are the master weights, the all-gather casts them to bf16 (half the bytes on the wire),
every layer computes in bf16, and gradients are reduce-scattered in fp32. No autocast on top:
autocast would cast each gathered fp32 weight into a bf16 copy that autograd keeps until
backward, a whole bf16 model on every rank, which is what sharding saves. What changes against
the autocast path: the residual stream is bf16 (under autocast it stays fp32, because the
embedding is not autocast). RMSNorm, RoPE and log_softmax still compute in fp32 inside the model
(model.py, packing.py), and the rotary cos/sin enter each layer uncast (cast_forward_inputs
False: they are fp32 on purpose; the hidden states are bf16 already).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from .checkpoint import load_config, load_model
from .distributed import DistEnv
from .model import CausalLM, RewardModel

# Gathered to rank 0's CPU, one tensor at a time: a GPU never holds the whole model at once.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Rank 0 passes the full state, the others nothing; each tensor is broadcast and each rank keeps its shard.
SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def is_sharded(model) -> bool:
    """True for a model that shard() has wrapped (its class then derives from FSDPModule)."""
    return isinstance(model, FSDPModule)


def mixed_precision(dtype: str, frozen: bool) -> MixedPrecisionPolicy:
    """bf16: compute in bf16 from fp32 shards, reduce gradients in fp32 (module docstring). A frozen
    model is stored in its compute dtype already (load_sharded) and has nothing to reduce."""
    if dtype == "bf16" and not frozen:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def ensure_process_group(env: DistEnv) -> None:
    """FSDP needs a process group; a single process (no torchrun) gets a group of one, so that
    --fsdp runs the same code whatever the number of ranks."""
    if not dist.is_initialized():
        cuda = env.device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=env.device if cuda else None)


def shard(model, env: DistEnv, dtype: str, frozen: bool = False):
    """Shard the model in place: each decoder layer is one unit (gathered for its forward and
    backward only), then the root holds what is left (embedding, final norm, head). Returns it."""
    ensure_process_group(env)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = mixed_precision(dtype, frozen)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)  # freed after forward, gathered again in backward
        register_fsdp_forward_method(layer, "forward_at")  # the reward model's last layer (model.py)
    if isinstance(model, RewardModel):  # the scalar head computes in fp32 (model.score_in_fp32): its own unit,
        fully_shard(model.score, mesh=mesh, mp_policy=mixed_precision("fp32", frozen))  # never cast to bf16
    # The root stays gathered after its forward: backward starts with it, and the DPO path reads
    # model.lm_head.weight after hidden_states returns (packing.answer_logps).
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if isinstance(model, CausalLM):
        register_fsdp_forward_method(model, "hidden_states")  # gathers the root as forward() would
    else:
        register_fsdp_forward_method(model, "rewards_at")  # the packed layout's reward (packing.py)
    # The reward model returns its rewards as a view (squeeze), which FSDP warns about in case the
    # caller modifies it in place; the losses (dpo.py, reward.py) never do.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPRewardModel\) returned a view tensor")
    return model


def load_sharded(path, env: DistEnv, dtype: str, reward: bool | None = None, frozen: bool = False, prepare=None):
    """The checkpoint at `path` as a sharded model: rank 0 alone reads it (to its CPU), the other
    ranks build the same modules on the meta device (no memory), every rank shards, and rank 0's
    tensors are scattered to the shards, one tensor at a time. Host memory: one copy of the model,
    on rank 0. Rank 0's values win, so a freshly initialised reward head is the same on every rank.
    frozen: a reference model, no gradients, stored in the compute dtype (bf16 under --dtype bf16:
    exactly the bf16 values the policy's all-gather produces from the same fp32 weights).
    prepare: a change made to the whole model before sharding (lora.apply_lora: its adapters are
    sharded like any parameter, rank 0's initial values scattered with the rest)."""
    if env.is_main:
        model = load_model(path, reward=reward)
    else:
        cfg = load_config(path)
        with torch.device("meta"):
            model = RewardModel(cfg) if (cfg.is_reward_model if reward is None else reward) else CausalLM(cfg)
    if prepare is not None:
        prepare(model)
    if frozen:
        model.eval().requires_grad_(False)
        if dtype == "bf16":
            model.to(torch.bfloat16)
    full = model.state_dict() if env.is_main else {}  # rank 0's tensors, kept on its CPU
    shard(model, env, dtype, frozen)
    if not env.is_main:
        model.to_empty(device=env.device)  # storage for the shards; the values come next
    set_model_state_dict(model, full, options=SCATTER)
    return model


class FreeingRootAfter:
    """A live reference (dpo.LiveReference) of a sharded frozen model that frees the model's
    gathered root after each call. The root stays gathered after a forward, for backward to use;
    a frozen model has no backward, so it would hold its embedding and head whole for good."""

    def __init__(self, reference, ref_model):
        self.reference, self.model = reference, ref_model

    def __call__(self, batch):
        out = self.reference(batch)
        self.model.reshard()
        return out


def release(model) -> None:
    """Give back what a model no longer needed holds on the device, before its last reference is
    dropped. A sharded model's root stays gathered after a forward (for a backward a frozen model
    never runs): reshard it. A replicated model holds nothing beyond its parameters."""
    if is_sharded(model):
        model.reshard()


class FSDPGradSync:
    """GradReducer's interface (reducer.py) over FSDP2's own reduce-scatter.

    By default every micro-step reduce-scatters: each rank keeps only its shard of the gradient,
    summed over micro-steps (sum of means = mean of sums, so the step equals one large batch).
    accumulate_unsharded=True skips the reduce-scatter on non-final micro-steps
    (set_requires_gradient_sync(False)), as GradReducer skips its all-reduce; FSDP then holds every
    gradient unsharded in fp32 until the final one, 4 bytes per parameter per rank, which is more
    than the sharded weights, gradients and moments together take on 8 ranks. Worth it only for a
    model small enough to leave that room, where data parallel by hand is the better choice anyway.
    """

    def __init__(self, model, accumulate_unsharded: bool = False):
        self.model = model
        self.accumulate_unsharded = accumulate_unsharded

    def set_sync(self, sync: bool) -> None:
        self.model.set_requires_gradient_sync(bool(sync) or not self.accumulate_unsharded)

    def wait(self) -> None:
        """Nothing left to wait for: FSDP's backward ends by waiting for its last reduce-scatter."""

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """GradReducer.clip_grad_norm over the shards: the norm of the full gradient (torch computes
        it from every rank's shard), returned as a plain 0-d tensor, equal on every rank."""
        return local_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))


def gather_model_state(model) -> dict[str, torch.Tensor]:
    """Full weights by Hugging Face name on rank 0's CPU ({} on the other ranks). A collective."""
    return get_model_state_dict(model, options=GATHER)


def gather_optimizer_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's full state on rank 0's CPU, {param name: {"step", "exp_avg", "exp_avg_sq"}} ({} on
    the other ranks; a tied weight under its first name, as named_parameters lists it). A collective."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER).get("state", {})


def scatter_state(model, optimizer, weights: dict | None, adamw: dict | None) -> None:
    """Rank 0's full weights and AdamW state ({param name: {...}}) into every rank's shards; the
    other ranks pass None. A collective."""
    names = {id(p): n for n, p in model.named_parameters()}
    set_model_state_dict(model, weights or {}, options=SCATTER)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    state = {"state": adamw, "param_groups": groups} if adamw is not None else {}
    set_optimizer_state_dict(model, optimizer, state, options=SCATTER)


def local_value(x):
    """A DTensor's full value as a plain tensor (clip_grad_norm_ returns the norm as a replicated
    DTensor under FSDP); anything else unchanged."""
    return x.full_tensor() if isinstance(x, DTensor) else x


__all__ = ["is_sharded", "shard", "load_sharded", "FreeingRootAfter", "release", "FSDPGradSync", "gather_model_state",
           "gather_optimizer_state", "scatter_state", "local_value", "mixed_precision", "ensure_process_group"]
