"""Averaging gradients over ranks by hand: the heart of data parallelism without DistributedDataParallel.

Every rank holds a full copy of the model and runs forward/backward on its own slice of the
global batch (distributed.py broadcasts rank 0's parameters at start). After backward, every
gradient is replaced by its average over ranks, and every rank then clips and steps the same
optimizer on the same averaged gradients, so the copies stay identical.

Why averaging is right: each rank's loss is the mean over its pairs, so
    grad of the global-batch mean = (1 / world) * sum over ranks r of grad(mean loss on rank r),
an all-reduce with op SUM followed by a division by world_size. (NCCL and gloo both have SUM;
AVG exists only on some backends, so SUM-then-divide works everywhere.)

The all-reduce overlaps backward (docs/data_parallel.md): gradients are grouped into buckets of
~25 MB in reverse registration order, roughly the order backward produces them; a hook on each
parameter notices when the last gradient of a bucket is in and launches that bucket's
all-reduce asynchronously, while autograd goes on with the earlier layers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import DistEnv

MB = 2**20  # bytes in a megabyte, as bucket_mb counts them


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
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, bucket, j))
                      for bucket in self.buckets for j, p in enumerate(bucket.params)]
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
        flags = bucket.buffer[bucket.numel:]  # one per parameter
        if len(bucket.touched) == len(bucket.params):  # the usual case
            flags.fill_(1)
        else:  # integer indices, one at a time: a list index would be copied to the GPU and waited for
            flags.zero_()
            for j in bucket.touched:
                flags[j] = 1
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

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Scale the averaged gradients down to a total L2 norm of at most max_norm, the same on every
        rank (their gradients are equal after wait()); returns the norm before clipping, 0-d."""
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def remove(self) -> None:
        """Unregister the hooks and drop the gradients (the model can get another reducer)."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for p in self.params:
            p.grad = None


# ---------------------------------------------------------------------- numbers over ranks
# The step's metrics travel the same way as its gradients, as sums (never means) over ranks.

def all_reduce_sums(values: dict, env: DistEnv) -> dict[str, float]:
    """{name: number or 0-d tensor} summed over ranks, as floats; every rank gets the same dict back.

    Ranks send sums and counts (never means), so that e.g. `loss_sum / count` after the
    reduction is exactly the single-process mean even when ranks saw different counts.
    All ranks must pass the same keys; they are packed in sorted order into one float64
    tensor (float64: a sum of many float32 losses keeps its digits), one collective, and fetched
    to the host in one transfer: on a GPU, the step's one wait for the device (train.train_step).
    """
    keys = sorted(values)
    packed = pack_float64([values[k] for k in keys], env.device)  # (len(keys),)
    if env.world_size > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    summed = dict(zip(keys, packed.tolist()))
    return {k: summed[k] for k in values}


def pack_float64(values: list, device) -> torch.Tensor:
    """Numbers and 0-d tensors as one float64 vector on `device`, without waiting for the device:
    tensors already there are stacked where they are; host numbers travel in one non-blocking copy
    from pinned memory (a blocking copy would wait for every kernel queued before it)."""
    device = torch.device(device)
    on_device = [torch.is_tensor(v) and v.device.type == device.type for v in values]
    host = torch.tensor([float(v) for v, here in zip(values, on_device) if not here], dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()
    host = iter(host.to(device, non_blocking=True).unbind())  # the host numbers, in order
    packed = [v.detach().to(torch.float64).reshape(()) if here else next(host) for v, here in zip(values, on_device)]
    return torch.stack(packed) if packed else torch.zeros(0, dtype=torch.float64, device=device)


def all_reduce_max(value: float, env: DistEnv) -> float:
    """The largest of one number over ranks (e.g. peak memory: the rank closest to its limit)."""
    if env.world_size == 1:
        return float(value)
    t = pack_float64([value], env.device)  # (1,)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


__all__ = ["Bucket", "make_buckets", "GradReducer", "all_reduce_sums", "all_reduce_max", "pack_float64"]
