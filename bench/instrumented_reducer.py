"""GradReducer with counters and clocks, for the tests and benchmarks of data parallelism (not for
training: the reducer chapter, minialign/reducer.py, stays free of instrumentation).

bench/bench_allreduce.py compares wait_s with and without overlap; tests/test_distributed.py
checks that every parameter takes part in exactly one all-reduce per step and that buckets are
launched during backward.
"""
from __future__ import annotations

import time

import torch

from minialign.reducer import GradReducer


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
