"""Data parallel training by hand, on torch.distributed primitives only (no DistributedDataParallel).

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
    torchrun --nproc_per_node 8 train_dpo.py ...
"""
from __future__ import annotations

import datetime
import os
import time
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import UserError

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
        return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but this node sees {torch.cuda.device_count()} GPU(s): start at "
                        "most one process per GPU (torchrun --nproc_per_node), or check CUDA_VISIBLE_DEVICES")
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
    """Leave the process group (no-op when none was started; --fsdp starts one even for one process)."""
    if dist.is_initialized():
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


def all_reduce_max(value: float, env: DistEnv) -> float:
    """The largest of one number over ranks (e.g. peak memory: the rank closest to its limit)."""
    if env.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, env: DistEnv):
    """Rank 0's picklable object on every rank (small things: a step number, a list of names).
    Pickle is safe here: the bytes come from our own rank 0, never from a file."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


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


@dataclass
class Bucket:
    """Parameters whose gradients travel in one all-reduce, stored in one flat buffer.

    buffer layout: [grad of params[0] | grad of params[1] | ... | one flag per param]. Each
    parameter's .grad is a view into its slice, so backward writes gradients where the
    all-reduce reads them. The flag says whether this rank had a gradient for that parameter
    this step; after the SUM, a flag of 0 means no rank had one, and the parameter keeps
    grad None, as it would in single-process training.
    """

    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]  # start of each param's gradient in buffer
    numel: int  # gradient elements (the flags follow)
    buffer: torch.Tensor  # (numel + len(params),)
    touched: set = field(default_factory=set)  # params with a gradient since zero_grad (any micro-step)
    ready: set = field(default_factory=set)  # params whose gradient of the final backward is in
    work: object = None  # the async all-reduce handle once launched

    def grad_view(self, j: int) -> torch.Tensor:
        p = self.params[j]
        return self.buffer[self.offsets[j]:self.offsets[j] + p.numel()].view_as(p)

    @property
    def nbytes(self) -> int:
        return self.numel * self.buffer.element_size()


def make_buckets(named_params: list[tuple[str, nn.Parameter]], bucket_bytes: int) -> list[Bucket]:
    """Cut (name, param) pairs, in the given order, into buckets of about bucket_bytes.

    A bucket closes once it reaches bucket_bytes (a single larger parameter gets a bucket
    of its own) or when the dtype/device changes, since one flat buffer has one dtype.
    """
    buckets, current, size = [], [], 0

    def close():
        offsets = [sum(p.numel() for _, p in current[:j]) for j in range(len(current))]
        numel = sum(p.numel() for _, p in current)
        p0 = current[0][1]
        buffer = torch.zeros(numel + len(current), dtype=p0.dtype, device=p0.device)
        buckets.append(Bucket([p for _, p in current], [n for n, _ in current], offsets, numel, buffer))
        current.clear()

    for name, p in named_params:
        if current and (p.dtype != current[0][1].dtype or p.device != current[0][1].device):
            close()
            size = 0
        current.append((name, p))
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            close()
            size = 0
    if current:
        close()
    return buckets


class GradReducer:
    """Average gradients over ranks with bucketed all-reduces that overlap backward.

    Use, in the training step (train.py):
        reducer = GradReducer(model, env)     # after broadcast_parameters, before any backward
        for micro in range(A):
            reducer.set_sync(micro == A - 1)
            (loss / pairs).backward()         # hooks launch each bucket's all-reduce when it is full
        reducer.wait()                        # p.grad = mean over ranks; then clip, step
        reducer.zero_grad()                   # instead of optimizer.zero_grad(): keeps the views

    The algorithm is three steps: (1) a hook on each parameter notes when its gradient is in,
    (2) a full bucket's all-reduce is launched, buckets strictly in order, (3) wait() finishes
    them and divides by the world size. Gradients live in the bucket buffers (each .grad is a
    view), as DistributedDataParallel's gradient_as_bucket_view does: no second copy of every
    gradient, no copy in or out. With no process group (one process) every method is trivial.
    """

    def __init__(self, model: nn.Module, env: DistEnv, bucket_mb: float = 25):
        self.env = env
        self.active = dist.is_available() and dist.is_initialized()
        if env.world_size > 1 and not self.active:
            raise RuntimeError("GradReducer: world_size > 1 but no process group; call init_distributed first")
        # named_parameters() yields a shared (tied) tensor once, so a tied lm_head/embedding is
        # reduced once. Reversed: backward produces gradients from the last layer to the first,
        # so buckets fill (and launch) in that order.
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.buckets = make_buckets(list(reversed(named)), int(bucket_mb * MB)) if self.active else []
        self.sync = True
        self.launched = 0  # buckets 0 .. launched-1 are on their way this step
        for bucket in self.buckets:
            for j, p in enumerate(bucket.params):
                p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, bucket, j))
        self.zero_grad()

    def set_sync(self, sync: bool) -> None:
        """False on the non-final micro-steps of gradient accumulation: gradients only
        accumulate locally. Communicating every micro-step would send A times the bytes for the
        same result, since summing then averaging is linear."""
        self.sync = bool(sync)

    def _on_grad_ready(self, bucket: Bucket, j: int, p: nn.Parameter) -> None:
        """(1) Post-accumulate-grad hook: p.grad (a view into the bucket) now holds p's gradient."""
        if bucket.work is not None:
            raise RuntimeError(f"GradReducer: parameter '{bucket.names[j]}' received a gradient after its bucket "
                               "was all-reduced; only the last backward of a step may run with set_sync(True)")
        bucket.touched.add(j)
        if self.sync:
            bucket.ready.add(j)
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        """(2) Launch complete buckets strictly in bucket order. Collectives are matched across
        ranks by the order they are issued, not by name: had rank 0 launched bucket 2 then 1 and
        rank 1 bucket 1 then 2, bucket 2 would be summed with bucket 1 (garbage, or a hang). A
        bucket left incomplete (a parameter this rank's data did not use) holds back the later
        ones until wait(), which launches the rest in the same order."""
        while self.launched < len(self.buckets) and len(self.buckets[self.launched].ready) == len(
                self.buckets[self.launched].params):
            self._launch(self.buckets[self.launched])

    def _launch(self, bucket: Bucket) -> None:
        flags = bucket.buffer[bucket.numel:]
        flags.zero_()
        flags[sorted(bucket.touched)] = 1
        bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, async_op=True)
        self.launched += 1

    def wait(self) -> None:
        """(3) Finish the step's reduction: afterwards p.grad = (sum over ranks of p.grad) / world_size."""
        if not self.active:
            return
        while self.launched < len(self.buckets):  # not launched during backward: same order on every rank
            self._launch(self.buckets[self.launched])
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.env.world_size)  # SUM / world = mean over ranks (module docstring)
            untouched = [j for j in range(len(bucket.params)) if j not in bucket.touched]
            if untouched:  # did any other rank have a gradient for them? (rare: a host sync only here)
                flags = bucket.buffer[bucket.numel:][untouched].tolist()
                for j, flag in zip(untouched, flags):
                    if flag == 0:
                        bucket.params[j].grad = None

    def zero_grad(self) -> None:
        """Zero the bucket buffers and point every .grad back at its view (one process: grad None)."""
        if not self.active:
            for p in self.params:
                p.grad = None
            return
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.touched, bucket.ready, bucket.work = set(), set(), None
            for j, p in enumerate(bucket.params):
                p.grad = bucket.grad_view(j)
        self.launched = 0


class InstrumentedGradReducer(GradReducer):
    """GradReducer that also records what it did, for tests and benchmarks.

    After each wait():
      reduce_counts  {param name: all-reduces it took part in during that step} (1 each)
      last_wait_s    seconds blocked in that wait(); wait_s and steps accumulate over calls
      buckets_in_backward / buckets_in_wait  how many all-reduces were launched by hooks
                     during backward (overlapped) versus only at wait() (exposed)
    With overlap=False every bucket is launched inside wait(): the same communication with
    nothing hidden, the baseline a benchmark compares wait_s against. With timing=True, on
    CUDA, wait() synchronises the compute stream on entry and exit, so that wait_s is the
    communication left exposed after backward's kernels finished.
    """

    def __init__(self, model, env, bucket_mb: float = 25, overlap: bool = True, timing: bool = False):
        self.overlap, self.timing = overlap, timing
        self.reduce_counts, self._counts = {}, {}
        self.last_wait_s = self.wait_s = 0.0
        self.steps = self.buckets_in_backward = self.buckets_in_wait = 0
        self._in_wait = False
        super().__init__(model, env, bucket_mb)

    def _launch_ready_buckets(self):
        if self.overlap:
            super()._launch_ready_buckets()

    def _launch(self, bucket):
        super()._launch(bucket)
        if self._in_wait:
            self.buckets_in_wait += 1
        else:
            self.buckets_in_backward += 1
        for name in bucket.names:
            self._counts[name] = self._counts.get(name, 0) + 1

    def _sync_cuda(self):
        if self.timing and self.env.device.type == "cuda":
            torch.cuda.current_stream(self.env.device).synchronize()

    def wait(self):
        if not self.active:
            return
        self._sync_cuda()
        t0 = time.perf_counter()
        self._in_wait = True
        super().wait()
        self._in_wait = False
        self._sync_cuda()
        self.last_wait_s = time.perf_counter() - t0
        self.wait_s += self.last_wait_s
        self.steps += 1
        self.reduce_counts, self._counts = self._counts, {}


__all__ = [
    "DistEnv", "init_distributed", "destroy_distributed", "barrier", "print0", "all_reduce_sums",
    "all_reduce_max", "broadcast_object", "broadcast_tensors", "broadcast_parameters", "GradReducer",
    "InstrumentedGradReducer", "Bucket", "make_buckets",
]
