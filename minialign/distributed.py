"""Data parallel training by hand, on torch.distributed primitives only (no DDP, no FSDP).

Every rank holds a full copy of the model and runs forward/backward on its own slice of
the global batch. Three things keep the copies identical:
  1. at start, every parameter and buffer is broadcast from rank 0 (`broadcast_parameters`);
  2. after backward, every gradient is replaced by its average over ranks (`GradReducer`);
  3. every rank then clips and steps the same optimizer on the same averaged gradients.

Why averaging gradients is right: each rank's loss is a mean over its B items, so
    grad of the global-batch mean = (1 / world) * sum over ranks r of grad(mean loss on rank r),
which is an all-reduce with op SUM followed by a division by world_size. (NCCL and gloo
both have SUM; AVG exists only on some backends, so SUM-then-divide works everywhere.)

The gradient all-reduce is overlapped with backward (see docs/data_parallel.md):
gradients are grouped into buckets of ~25 MB in reverse registration order, which is
roughly the order backward produces them; a hook on each parameter notices when the last
gradient of a bucket has been accumulated and launches that bucket's all-reduce
asynchronously, while autograd goes on computing the gradients of earlier layers.

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT:
    torchrun --nproc_per_node 8 -m minialign.train ...
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

MB = 2**20  # bytes in a megabyte, as bucket_mb counts them
DEFAULT_TIMEOUT_S = 1800  # a collective that waits this long means a rank died or diverged


@dataclass
class DistEnv:
    """Where this process sits in the job: plain values, passed around explicitly."""

    rank: int  # 0 .. world_size-1 over all nodes
    world_size: int
    local_rank: int  # index of this process on its node = its GPU index
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates-and-prints and writes checkpoints."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"environment variable {name} is not set; launch with torchrun, which sets "
                           "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


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
        return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda:
        # One GPU per process, chosen by the rank on this node; set it before NCCL starts so
        # that NCCL's communicators and every default-device allocation land on that GPU.
        device = torch.device("cuda", local_rank)
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
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed(env: DistEnv) -> None:
    """Leave the process group (no-op single process)."""
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait until every rank reaches this line (no-op single process)."""
    if env.world_size > 1:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def print0(env: DistEnv, *args, **kwargs) -> None:
    """print on rank 0 only, flushed at once so logs of a long job show up as they happen."""
    if env.is_main:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def all_reduce_sums(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """{name: float} summed over ranks; every rank gets the same dict back.

    Ranks send sums and counts (never means), so that e.g. `loss_sum / count` after the
    reduction is exactly the single-process mean even when ranks saw different counts.
    All ranks must pass the same keys; they are packed in sorted order into one float64
    tensor (float64: a sum of many float32 losses keeps its digits), one collective.
    """
    if env.world_size == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    summed = dict(zip(keys, packed.tolist()))
    return {k: summed[k] for k in values}


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


@dataclass
class Bucket:
    """Parameters whose gradients travel in one all-reduce, packed into one flat buffer.

    buffer layout: [grad of params[0] | grad of params[1] | ... | one flag per param]; the
    flag is 1 if this rank had a gradient for that parameter, so after the SUM we know
    whether any rank had one (a parameter no rank touched keeps grad None, as it would
    in single-process training).
    """

    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]  # start of each param's gradient in buffer
    numel: int  # gradient elements (the flags follow)
    buffer: torch.Tensor | None = None  # allocated on first use: (numel + len(params),)
    ready: set | None = None  # indices of params whose gradient is accumulated this step
    work: object = None  # the async all-reduce handle once launched

    @property
    def is_ready(self) -> bool:
        """Every parameter of the bucket has its gradient for this step."""
        return len(self.ready) == len(self.params)

    @property
    def nbytes(self) -> int:
        return self.numel * self.params[0].element_size()


def make_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> list[Bucket]:
    """Cut (name, param) pairs, in the given order, into buckets of about bucket_bytes.

    A bucket closes once it reaches bucket_bytes (a single larger parameter gets a bucket
    of its own) or when the dtype/device changes, since one flat buffer has one dtype.
    """
    buckets, current = [], []

    def close():
        if current:
            offsets, n = [], 0
            for _, p in current:
                offsets.append(n)
                n += p.numel()
            buckets.append(Bucket([p for _, p in current], [name for name, _ in current], offsets, n))
            current.clear()

    size = 0
    for name, p in named_params:
        if current and (p.dtype != current[0][1].dtype or p.device != current[0][1].device):
            close()
            size = 0
        current.append((name, p))
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            close()
            size = 0
    close()
    return buckets


class GradReducer:
    """Average gradients over ranks with bucketed all-reduces that overlap backward.

    Call order in the training loop (see docs/data_parallel.md):
        reducer = GradReducer(model, env)     # after broadcast_parameters, before any backward
        for micro in range(accum):
            reducer.set_sync(micro == accum - 1)
            (loss / accum).backward()
        reducer.wait()                        # p.grad = mean over ranks; then clip, step, zero_grad

    Inactive (every method a no-op) when no process group is initialised, i.e. world_size 1.

    After each wait():
      reduce_counts  {param name: all-reduces it took part in during that step} (1 each)
      last_wait_s    seconds blocked in that wait(); wait_s and steps accumulate over calls
      buckets_in_backward / buckets_in_wait  how many all-reduces were launched by hooks
                     during backward (overlapped) versus only at wait() (exposed)
    With overlap=False every bucket is launched inside wait(): the same communication with
    nothing hidden, the baseline a benchmark compares wait_s against. With timing=True,
    on CUDA, wait() synchronises the compute stream on entry and exit, so that wait_s is
    the communication time left exposed after backward's kernels finished (without it,
    CUDA waits are asynchronous and wait_s measures only the CPU side).
    """

    def __init__(self, model: nn.Module, env: DistEnv, bucket_mb: float = 25, overlap: bool = True,
                 timing: bool = False):
        self.env = env
        self.overlap = overlap
        self.timing = timing
        self.active = dist.is_available() and dist.is_initialized()
        if env.world_size > 1 and not self.active:
            raise RuntimeError("GradReducer: world_size > 1 but no process group; call init_distributed first")
        # named_parameters() yields a shared (tied) tensor once, under its first name, so a
        # tied lm_head/embedding is reduced once. Reversed: backward produces gradients
        # from the last layers to the first, so buckets fill (and launch) in that order.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.buckets = make_buckets(list(reversed(named)), int(bucket_mb * MB))
        self._where = {}  # id(param) -> (bucket index, position in bucket)
        for b_i, b in enumerate(self.buckets):
            for j, p in enumerate(b.params):
                self._where[id(p)] = (b_i, j)
        self._sync = True
        self._next = 0  # first bucket not launched yet this step
        self._reset_step()
        self.reduce_counts: dict[str, int] = {}
        self.last_wait_s = 0.0
        self.wait_s = 0.0
        self.steps = 0
        self.buckets_in_backward = 0
        self.buckets_in_wait = 0
        self._hooks = []
        if self.active:
            for _, p in named:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def set_sync(self, sync: bool) -> None:
        """False on the non-final micro-steps of gradient accumulation: hooks do nothing and
        gradients only accumulate locally in p.grad. Communicating every micro-step would
        send accum times the bytes for the same result, since sum-then-average is linear."""
        self._sync = bool(sync)

    def remove(self) -> None:
        """Unregister the hooks (the model trains single-process again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _reset_step(self):
        for b in self.buckets:
            b.ready, b.work = set(), None
        self._next = 0
        self._counts = {}

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook: p.grad now holds this backward's gradient for p."""
        if not (self._sync and self.overlap):
            return
        b_i, j = self._where[id(p)]
        bucket = self.buckets[b_i]
        if bucket.work is not None:
            raise RuntimeError(
                f"GradReducer: parameter '{bucket.names[j]}' received a gradient after its bucket was "
                "all-reduced; only the last backward of a step may run with set_sync(True)")
        bucket.ready.add(j)
        self._launch_ready_buckets()

    def _launch_ready_buckets(self):
        # Strictly in bucket order: collectives are matched across ranks by the order they
        # are issued, not by name. If rank 0 launched bucket 2 then 1 while rank 1 launched
        # 1 then 2, rank 0's bucket 2 would be summed with rank 1's bucket 1 (garbage, or a
        # hang if sizes differ). A bucket that is not complete here (a parameter unused by
        # this rank's data) holds back the later ones until wait(), which launches the rest
        # in the same order; every rank thus issues buckets 0, 1, 2, ... exactly once.
        while self._next < len(self.buckets) and self.buckets[self._next].is_ready:
            self._launch(self.buckets[self._next])
            self.buckets_in_backward += 1
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        """Pack the bucket's gradients (zeros where this rank has none) and start the SUM."""
        if bucket.buffer is None:
            p0 = bucket.params[0]
            bucket.buffer = torch.empty(bucket.numel + len(bucket.params), dtype=p0.dtype, device=p0.device)
        buf = bucket.buffer
        with torch.no_grad():
            for j, (p, start) in enumerate(zip(bucket.params, bucket.offsets)):
                view = buf[start : start + p.numel()]
                flag = buf[bucket.numel + j]
                if p.grad is None:  # unused on this rank: contribute zeros to the same collective
                    view.zero_()
                    flag.fill_(0)
                else:
                    view.copy_(p.grad.reshape(-1))
                    flag.fill_(1)
        bucket.work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)
        for name in bucket.names:
            self._counts[name] = self._counts.get(name, 0) + 1

    def _sync_cuda(self):
        if self.timing and self.env.device.type == "cuda":
            torch.cuda.current_stream(self.env.device).synchronize()

    def wait(self) -> None:
        """Finish the step's reduction: afterwards p.grad = (sum over ranks of p.grad) / world_size."""
        if not self.active:
            return
        self._sync_cuda()
        t0 = time.perf_counter()
        for bucket in self.buckets[self._next :]:  # not launched during backward: same order
            self._launch(bucket)
            self.buckets_in_wait += 1
        self._next = len(self.buckets)
        for bucket in self.buckets:
            bucket.work.wait()
            buf = bucket.buffer
            buf.div_(self.env.world_size)  # SUM / world = mean over ranks (see module docstring)
            with torch.no_grad():
                for j, (p, start) in enumerate(zip(bucket.params, bucket.offsets)):
                    mean = buf[start : start + p.numel()].view_as(p)
                    if p.grad is not None:
                        p.grad.copy_(mean)
                    elif buf[bucket.numel + j].item() > 0:  # some other rank had a gradient
                        p.grad = mean.clone()  # own memory: the buffer is reused next step
        self._sync_cuda()
        self.last_wait_s = time.perf_counter() - t0
        self.wait_s += self.last_wait_s
        self.steps += 1
        self.reduce_counts = self._counts
        self._reset_step()


__all__ = [
    "DistEnv", "init_distributed", "destroy_distributed", "barrier", "print0", "all_reduce_sums",
    "broadcast_parameters", "GradReducer", "Bucket", "make_buckets",
]
