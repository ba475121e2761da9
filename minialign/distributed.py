"""Where a process sits in a data-parallel job, and the collectives minialign uses.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the
process group: NCCL on cuda:LOCAL_RANK, gloo on CPU, with a finite timeout so a dead or
diverged rank ends the job instead of hanging it. The rest are thin, named wrappers of
torch.distributed collectives, each a no-op in a single process: rank 0's objects and tensors on
every rank (`broadcast_object`, `broadcast_tensors`, `broadcast_parameters`), a `barrier`.
Averaging the gradients, and summing a step's metrics over ranks, is reducer.py's job.

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT:
    torchrun --nproc_per_node 8 train_dpo.py ...
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError

DEFAULT_TIMEOUT_S = 1800  # a collective that waits this long means a rank died or diverged
# A wait for rank 0's writes (a checkpoint, the model, a cache) lasts as long as the disk takes: 12
# bytes per parameter of a 32B model on slow shared storage can take longer than any collective should.
DISK_WAIT_TIMEOUT_S = 6 * 3600


@dataclass
class DistEnv:
    """Where this process sits in the job: plain values, passed around explicitly."""

    rank: int  # 0 .. world_size-1 over all nodes
    world_size: int
    local_rank: int  # index of this process on its node = its GPU index
    device: torch.device
    # A CPU (gloo) group over the same ranks, with the long DISK_WAIT_TIMEOUT_S, for barrier():
    # waiting there enqueues no NCCL work, so NCCL's watchdog (--dist_timeout) cannot fire.
    disk_wait_group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates-and-prints and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise UserError(f"environment variable {name} is not set; launch with torchrun, which sets "
                        "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, device=None) -> DistEnv:
    """Join the process group described by torchrun's environment variables.

    WORLD_SIZE unset or 1: a single process, no process group; the device is `device` if
    given, else cuda when available, else cpu. Otherwise: NCCL on cuda:LOCAL_RANK when
    CUDA is used, gloo on CPU. `timeout_s` bounds every collective, so a rank that died or
    took another code path ends the job with an error instead of a silent hang (NCCL's
    watchdog aborts the process; gloo raises in the rank that waits).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # An index, always: --fsdp starts a group of one with this device as NCCL's device_id,
            # and init_process_group refuses "cuda" without one ("Please use a device_id with index").
            device = torch.device("cuda", torch.cuda.current_device())
        return DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda:
        # One GPU per process, chosen by the rank on this node; set it before NCCL starts so
        # that NCCL's communicators and every default-device allocation land on that GPU.
        device = torch.device("cuda", cuda_index(local_rank))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",  # MASTER_ADDR and MASTER_PORT name rank 0's rendezvous store
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if use_cuda else None,
    )
    disk_wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=DISK_WAIT_TIMEOUT_S))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   disk_wait_group=disk_wait_group)


def cuda_index(local_rank: int) -> int:
    """The GPU of the process with this LOCAL_RANK: the GPU of that index when the node's GPUs are
    all visible (torchrun), or the only one visible when the launcher gives each process its own
    GPU through CUDA_VISIBLE_DEVICES (some SLURM setups: LOCAL_RANK 0..7, one GPU each)."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise UserError(f"LOCAL_RANK {local_rank} but this node sees {visible} GPU(s): start at most one process "
                        "per GPU (torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES")
    return local_rank


def destroy_distributed() -> None:
    """Leave the process group (no-op when none was started; --fsdp starts one even for one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed(env: DistEnv) -> None:
    """The end of a run that succeeded: every rank waits until all have arrived (rank 0 may still be
    writing the model), then leaves the process group. A rank that tears its group down while another
    still works can abort at exit (seen with gloo: "terminate called without an active exception"),
    and torchrun then kills the rank that was saving. Error paths call destroy_distributed alone: a
    rank that failed must not wait for ranks that may never arrive."""
    barrier(env)
    destroy_distributed()


def barrier(env: DistEnv) -> None:
    """Wait until every rank reaches this line (no-op single process). minialign's barriers all wait
    for rank 0 to finish writing files, so they wait on the gloo group of init_distributed, whose
    timeout is DISK_WAIT_TIMEOUT_S, not --dist_timeout: a slow disk is not a dead rank."""
    if env.world_size > 1:
        if env.disk_wait_group is not None:
            dist.barrier(group=env.disk_wait_group)
        elif env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def print0(env: DistEnv, *args, **kwargs) -> None:
    """print on rank 0 only, flushed at once so logs of a long job show up as they happen."""
    if env.is_main:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def broadcast_object(obj, env: DistEnv):
    """Rank 0's picklable object on every rank (small things: a step number, a list of names).
    Pickle is safe here: the bytes come from our own rank 0, never from a file."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's picklable object, in rank order, on every rank (small things only)."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, env: DistEnv) -> dict[str, torch.Tensor]:
    """Rank 0's {name: tensor} on every rank, on env.device (the other ranks pass None).

    Names, shapes and dtypes go first, so every rank can allocate; then one broadcast per tensor.
    This is how a checkpoint read by rank 0 alone reaches ranks whose disks do not hold it."""
    if env.world_size == 1:
        return {k: v.to(env.device) for k, v in tensors.items()}
    meta = broadcast_object(None if tensors is None else [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], env)
    out = {}
    for name, shape, dtype in meta:
        t = tensors[name].to(env.device) if env.is_main else torch.empty(shape, dtype=dtype, device=env.device)
        dist.broadcast(t, src=0)
        out[name] = t
    return out


@torch.no_grad()
def broadcast_parameters(model: nn.Module, env: DistEnv) -> None:
    """Overwrite every parameter and buffer, in place, with rank 0's values.

    Ranks may have initialised differently (different seeds, different loading order);
    after this they hold identical copies, which identical averaged gradients keep equal.
    """
    if env.world_size == 1:
        return
    tensors = list(model.parameters()) + list(model.buffers())  # each shared tensor once
    # A model built differently on some rank would pair mismatched tensors (or hang): check first.
    signature = torch.tensor([len(tensors), sum(t.numel() for t in tensors)], dtype=torch.int64, device=env.device)
    gathered = [torch.zeros_like(signature) for _ in range(env.world_size)]
    dist.all_gather(gathered, signature)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        shapes = {r: tuple(g.tolist()) for r, g in enumerate(gathered)}
        raise RuntimeError(f"ranks hold different models: (tensor count, elements) per rank = {shapes}")
    for t in tensors:
        dist.broadcast(t.data, src=0)


__all__ = [
    "DistEnv", "init_distributed", "cuda_index", "destroy_distributed", "finish_distributed", "barrier", "print0",
    "broadcast_object", "gather_objects", "broadcast_tensors", "broadcast_parameters",
]
