"""Hand-written data parallel against single-process references, on gloo with 2 CPU processes.

The 2-process tests launch this file as a script, twice, with the environment torchrun would
set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each rank saves what it got;
the test process recomputes the expected values with no torch.distributed at all:
the reduced gradients must equal the gradient of the average loss over both ranks' data
(invariant: 2 ranks equal 1 rank).
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minialign.reducer import all_reduce_sums
from minialign.distributed import (DistEnv, barrier, broadcast_parameters, destroy_distributed,
                                   finish_distributed, init_distributed, print0)
from minialign.reducer import GradReducer, make_buckets
from minialign.config import ModelConfig
from minialign.model import CausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the counting reducer is instrumentation: it lives in bench/
from instrumented_reducer import InstrumentedGradReducer  # noqa: E402
WORLD = 2
ACCUM = 3
SMALL_BUCKET_MB = 0.01  # ~10 KB: the tiny LM splits into several buckets, so ordering matters
ONE_PARAM_BUCKET_MB = 1e-9  # rounds to 0 bytes: every parameter closes its own bucket


# ---------------------------------------------------------------- models and data shared by ranks and references
def tiny_lm(seed: int) -> CausalLM:
    """A 2-layer Qwen2-style LM with tied embeddings (the tied tensor must be reduced once)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    return CausalLM(cfg)


def lm_batch(rank: int, micro: int):
    """(3, 9) token ids, different for every (rank, micro-step)."""
    g = torch.Generator().manual_seed(1000 * rank + micro)
    return torch.randint(0, 101, (3, 9), generator=g)


def lm_loss(model, ids):
    """Mean next-token cross-entropy: logits at t predict token t + 1."""
    logits = model(ids)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Branchy(nn.Module):
    """`maybe` is used only when asked (rank-dependent); `never` is used by nobody.

    Registration order never, inp, maybe, out gives reverse (bucket) order out, maybe, inp,
    never: on a rank that skips `maybe`, the ready `inp` bucket must wait behind it.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.never = nn.Linear(8, 8)
        self.inp = nn.Linear(4, 8)
        self.maybe = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x, use_maybe: bool):
        h = torch.tanh(self.inp(x))
        if use_maybe:
            h = h + torch.tanh(self.maybe(h))
        return self.out(h).mean()


def branchy_input(rank: int, micro: int):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 * rank + micro))


def uses_maybe(rank: int, micro: int, scenario: str) -> bool:
    """'unused': rank 1 never uses `maybe`; 'unused_accum': rank 1 uses it only on micro-step 0."""
    if rank == 0:
        return True
    return scenario == "unused_accum" and micro == 0


def grads_of(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- what each rank runs
def run_rank(out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    if scenario in ("rank_raises", "rank_stuck"):
        return run_failing_rank(scenario)
    if scenario == "nonfinite_one_rank":
        return run_nonfinite_rank()
    if scenario == "finish_waits":
        return run_finishing_rank(out_dir)
    env = init_distributed(timeout_s=60, device="cpu")
    res = {"env": (env.rank, env.world_size, env.local_rank, str(env.device), env.is_main)}

    # broadcast: different initialisations (and buffers) become rank 0's.
    holder = nn.ModuleDict({"lm": tiny_lm(seed=10 + env.rank), "bn": nn.BatchNorm1d(3)})
    holder.bn.running_mean.fill_(float(env.rank + 1))
    broadcast_parameters(holder, env)
    res["broadcast"] = {k: v.clone() for k, v in holder.state_dict().items()}

    res["sums"] = all_reduce_sums({"loss_sum": 1.5 * (env.rank + 1), "count": 3 + env.rank, "big": 1e15 + env.rank}, env)

    # step 1 without accumulation, step 2 with ACCUM micro-steps, same reducer.
    lm = tiny_lm(seed=env.rank)  # differs per rank on purpose: broadcast must fix it
    broadcast_parameters(lm, env)
    reducer = InstrumentedGradReducer(lm, env, bucket_mb=SMALL_BUCKET_MB)
    res["n_buckets"] = len(reducer.buckets)
    lm_loss(lm, lm_batch(env.rank, 0)).backward()
    reducer.wait()
    res["step1"] = {"grads": grads_of(lm), "counts": dict(reducer.reduce_counts),
                    "in_backward": reducer.buckets_in_backward, "in_wait": reducer.buckets_in_wait}
    reducer.zero_grad()  # not lm.zero_grad(): each .grad is a view into a bucket buffer
    launched_before_final = []
    for micro in range(ACCUM):
        reducer.set_sync(micro == ACCUM - 1)
        launched_before_final.append(reducer.buckets_in_backward + reducer.buckets_in_wait)
        (lm_loss(lm, lm_batch(env.rank, micro)) / ACCUM).backward()
    reducer.wait()
    res["step2"] = {"grads": grads_of(lm), "counts": dict(reducer.reduce_counts),
                    "launched_before_final": launched_before_final, "steps": reducer.steps}

    for scenario_name in ("unused", "unused_accum"):
        model = Branchy()
        red = InstrumentedGradReducer(model, env, bucket_mb=ONE_PARAM_BUCKET_MB)
        n_micro = 2 if scenario_name == "unused_accum" else 1
        for micro in range(n_micro):
            red.set_sync(micro == n_micro - 1)
            (model(branchy_input(env.rank, micro), uses_maybe(env.rank, micro, scenario_name)) / n_micro).backward()
        red.wait()
        res[scenario_name] = {"grads": grads_of(model), "counts": dict(red.reduce_counts),
                              "in_backward": red.buckets_in_backward, "n_buckets": len(red.buckets)}
    barrier(env)
    torch.save(res, Path(out_dir) / f"rank{env.rank}.pt")
    destroy_distributed()


def run_finishing_rank(out_dir: str) -> None:
    """Rank 0 is still writing (sleeps 8 s) when rank 1 reaches the end of the run: rank 1 must not
    leave the process group before rank 0 arrives. Each rank records when it arrived and left. The
    write outlasts the 5 s collective timeout: a wait for the disk must not time out like a dead rank."""
    env = init_distributed(timeout_s=5, device="cpu")
    all_reduce_sums({"x": 1.0}, env)  # both ranks are up: only rank 0's write stands between them
    if env.rank == 0:
        time.sleep(8.0)
    arrived = time.time()
    finish_distributed(env)
    torch.save({"arrived": arrived, "left": time.time()}, Path(out_dir) / f"finish{env.rank}.pt")


def run_failing_rank(scenario: str) -> None:
    """Rank 1 fails (raises, or is stuck) before a collective that rank 0 enters."""
    env = init_distributed(timeout_s=5, device="cpu")
    if env.rank == 1:
        if scenario == "rank_stuck":
            time.sleep(300)  # far past rank 0's 5 s timeout; the test kills us first
        raise RuntimeError("rank 1 fails on purpose")
    all_reduce_sums({"x": 1.0}, env)  # must raise after at most the timeout, not hang


def run_nonfinite_rank() -> None:
    """train_step where only rank 1's loss is NaN (its gradients stay finite): both ranks must stop
    with the same FloatingPointError, well before the 30 s collective timeout."""
    from contextlib import nullcontext

    from minialign.packing import PairBatch
    from minialign.train import train_step

    env = init_distributed(timeout_s=30, device="cpu")
    lm = tiny_lm(seed=0)
    reducer = GradReducer(lm, env)
    optimizer = torch.optim.AdamW(lm.parameters())

    def loss(model, batch):
        ids = batch.input_ids
        losses = torch.stack([lm_loss(model, ids[i:i + 1]) for i in range(ids.shape[0])])  # (3,)
        if env.rank == 1:  # a NaN in the value only: the detached term carries no gradient
            losses = losses + float("nan") * losses.detach()
        rewards = -losses.detach()  # (3,) stand-ins: train_step logs accuracy and margin from two rewards
        return losses, rewards, rewards, {}

    class Objective:
        pass

    objective = Objective()
    objective.loss = loss
    ids = lm_batch(env.rank, 0)  # (3, 9): three one-row "pairs"
    batch = PairBatch(packed=True, input_ids=ids, labels=ids, lengths=torch.full((3,), 9), label_rows=None,
                      label_cols=None, pair_index=torch.arange(3))
    start = time.monotonic()
    try:
        train_step(lm, objective, [batch], optimizer, reducer, 1e-3, 1.0, nullcontext(), env)
    except FloatingPointError as e:
        print(f"rank {env.rank} stopped: non-finite {e} after {time.monotonic() - start:.1f}s", flush=True)
        raise SystemExit(3)
    raise SystemExit(0)


# ---------------------------------------------------------------- launching from the test process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out_dir):
    """Start WORLD ranks of this file as torchrun would; return the Popen objects (started)."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir), scenario], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout: float):
    """Wait for every process (killing any left at the deadline); return (return codes, outputs)."""
    deadline = time.monotonic() + timeout
    codes, outputs = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        codes.append(p.returncode)
        outputs.append(out)
    return codes, outputs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the main 2-rank scenario once; the tests below each check one part of it."""
    out = tmp_path_factory.mktemp("dist")
    codes, outputs = finish(launch("main", out), timeout=90)
    assert codes == [0] * WORLD, "\n\n".join(f"rank {r} exit {c}:\n{o[-3000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_grads_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None, name
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- 2-process tests
@pytest.mark.distributed
def test_env_and_broadcast(ranks):
    assert [r["env"] for r in ranks] == [(0, 2, 0, "cpu", True), (1, 2, 1, "cpu", False)]
    reference = tiny_lm(seed=10)  # rank 0's initialisation
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ranks[0]["broadcast"]["lm." + name], value, atol=0, rtol=0)
    for name, value in ranks[0]["broadcast"].items():  # parameters and buffers alike
        assert torch.equal(ranks[1]["broadcast"][name], value), name
    assert torch.equal(ranks[1]["broadcast"]["bn.running_mean"], torch.ones(3))  # rank 0 filled 1.0


@pytest.mark.distributed
def test_all_reduce_sums(ranks):
    """1.5 * 1 + 1.5 * 2 = 4.5; 3 + 4 = 7; (1e15) + (1e15 + 1) = 2e15 + 1, exact in float64."""
    for r in ranks:
        assert r["sums"] == {"loss_sum": 4.5, "count": 7.0, "big": 2e15 + 1}
        assert list(r["sums"]) == ["loss_sum", "count", "big"]


def reference_lm_grads(micro_steps: int) -> dict:
    """Single process: gradient of mean over ranks of sum over micro-steps of loss / micro_steps."""
    lm = tiny_lm(seed=0)
    total = sum(lm_loss(lm, lm_batch(r, m)) / micro_steps for r in range(WORLD) for m in range(micro_steps)) / WORLD
    total.backward()
    return grads_of(lm)


@pytest.mark.distributed
def test_reduced_grads_equal_single_process_average(ranks):
    want = reference_lm_grads(micro_steps=1)
    assert "lm_head.weight" not in want  # tied: the embedding holds the one shared tensor
    for r in ranks:
        assert_grads_close(r["step1"]["grads"], want)
        assert r["step1"]["counts"] == {name: 1 for name in want}  # each parameter reduced exactly once
    for name in want:  # the ranks hold bitwise identical gradients, so their copies stay equal
        assert torch.equal(ranks[0]["step1"]["grads"][name], ranks[1]["step1"]["grads"][name]), name
    # The overlap happened: all buckets launched from hooks during backward, none left for wait().
    assert ranks[0]["n_buckets"] > 2
    assert all(r["step1"]["in_backward"] == r["n_buckets"] and r["step1"]["in_wait"] == 0 for r in ranks)


@pytest.mark.distributed
def test_grad_accumulation_communicates_once(ranks):
    want = reference_lm_grads(micro_steps=ACCUM)
    for r in ranks:
        assert_grads_close(r["step2"]["grads"], want)
        assert r["step2"]["counts"] == {name: 1 for name in want}  # counts reset between steps
        # Nothing was launched during the non-final micro-steps (counter stays at step 1's total).
        assert len(set(r["step2"]["launched_before_final"])) == 1
        assert r["step2"]["steps"] == 2


def reference_branchy_grads(scenario: str) -> dict:
    model = Branchy()
    n_micro = 2 if scenario == "unused_accum" else 1
    total = sum(model(branchy_input(r, m), uses_maybe(r, m, scenario)) / n_micro
                for r in range(WORLD) for m in range(n_micro)) / WORLD
    total.backward()
    return grads_of(model)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", ["unused", "unused_accum"])
def test_parameter_without_gradient_on_one_rank(ranks, scenario):
    """`maybe` has a gradient on rank 0 only (or, with accumulation, on rank 1 only from a
    non-final micro-step): the average still counts it; `never` keeps grad None everywhere."""
    want = reference_branchy_grads(scenario)
    assert want["never.weight"] is None and want["maybe.weight"] is not None
    for r in ranks:
        assert_grads_close(r[scenario]["grads"], want)
        assert r[scenario]["counts"] == {name: 1 for name in want}
    # Rank 1, missing `maybe` in its last backward, could launch only `out` (2 buckets) early;
    # rank 0 launched everything but `never` (6 of 8); both issued the same 8 all-reduces.
    assert ranks[0][scenario]["n_buckets"] == 8
    assert ranks[0][scenario]["in_backward"] == 6
    assert ranks[1][scenario]["in_backward"] == 2


@pytest.mark.distributed
def test_raising_rank_ends_the_job(tmp_path):
    codes, outputs = finish(launch("rank_raises", tmp_path), timeout=150)
    assert codes[1] != 0 and "fails on purpose" in outputs[1]
    assert codes[0] not in (0, -9), outputs[0]  # rank 0 failed by itself: it did not hang in its all_reduce


@pytest.mark.distributed
def test_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The finite check is agreed in the collective that sums the metrics: rank 0, whose own loss
    is finite, stops at the same step as rank 1 instead of waiting out the timeout."""
    codes, outputs = finish(launch("nonfinite_one_rank", tmp_path), timeout=120)
    assert codes == [3, 3], outputs
    assert all("stopped: non-finite loss" in o for o in outputs)
    # Each rank stopped by itself, not by the 30 s collective timeout (which raises another error).
    waited = [float(o.split(" after ")[1].split("s")[0]) for o in outputs]
    assert max(waited) < 20, waited


@pytest.mark.distributed
def test_ranks_leave_together_once_rank_0_has_written(tmp_path):
    """finish_distributed, the scripts' last call: rank 1, done first, waits for rank 0 (still saving)
    before leaving the group, so no rank tears its group down under another (which can abort under
    gloo and make torchrun kill the rank that was saving); and rank 0's write may take longer than
    --dist_timeout (before: rank 1's barrier timed out after 5 s)."""
    codes, outputs = finish(launch("finish_waits", tmp_path), timeout=120)
    assert codes == [0, 0], outputs
    rank0, rank1 = (torch.load(tmp_path / f"finish{r}.pt") for r in range(WORLD))
    assert rank0["arrived"] - rank1["arrived"] > 5.0  # rank 1 did arrive first, and waited past the timeout
    assert rank1["left"] >= rank0["arrived"]  # and left only once rank 0 was there


@pytest.mark.distributed
def test_stuck_rank_times_out(tmp_path):
    """Rank 1 sleeps 300 s without exiting: only the 5 s collective timeout can free rank 0 (the
    generous deadline below only absorbs slow process start-up on a loaded machine)."""
    procs = launch("rank_stuck", tmp_path)
    codes, outputs = finish(procs[:1], timeout=150)
    finish(procs[1:], timeout=0.1)  # kill the sleeper
    assert codes[0] not in (0, -9), outputs[0]  # exited by itself with an error, was not killed
    assert "Timed out" in outputs[0]  # gloo's own timeout message


# ---------------------------------------------------------------- single-process tests (no subprocess)
def test_single_process_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device, env.is_main) == (0, 1, 0, torch.device("cpu"), True)
    assert not dist.is_initialized()
    assert all_reduce_sums({"a": 2, "b": 0.5}, env) == {"a": 2.0, "b": 0.5}
    barrier(env)
    destroy_distributed()


def test_single_process_reducer_is_a_no_op():
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    lm = tiny_lm(seed=0)
    reducer = InstrumentedGradReducer(lm, env)
    broadcast_parameters(lm, env)
    lm_loss(lm, lm_batch(0, 0)).backward()
    before = grads_of(lm)
    reducer.wait()
    assert_grads_close(grads_of(lm), before)
    assert reducer.reduce_counts == {} and not reducer.active
    reducer.zero_grad()
    assert all(p.grad is None for p in lm.parameters())


def test_print0(capsys):
    print0(DistEnv(0, 2, 0, torch.device("cpu")), "hello", 3)
    print0(DistEnv(1, 2, 1, torch.device("cpu")), "not me")
    assert capsys.readouterr().out == "hello 3\n"


def test_gradients_live_in_the_bucket_buffers(one_rank_group):
    """Gradient as bucket view: every .grad is a view into its bucket's buffer, so backward writes
    where the all-reduce reads, and the reducer holds no second copy of the gradients (the
    buffers add only one flag per parameter)."""
    lm = tiny_lm(seed=0)
    reducer = GradReducer(lm, one_rank_group, bucket_mb=SMALL_BUCKET_MB)
    lm_loss(lm, lm_batch(0, 0)).backward()
    reducer.wait()
    for b in reducer.buckets:
        base = b.buffer.untyped_storage().data_ptr()
        for p in b.params:
            assert p.grad.untyped_storage().data_ptr() == base
    n_params = sum(p.numel() for p in lm.parameters())
    assert sum(b.buffer.numel() for b in reducer.buckets) == n_params + sum(len(b.params) for b in reducer.buckets)
    want = reference_lm_grads_one(lm)
    assert_grads_close(grads_of(lm), want)
    reducer.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in lm.parameters())
    lm_loss(lm, lm_batch(0, 0)).backward()  # accumulates into the same views after zero_grad
    reducer.wait()
    assert_grads_close(grads_of(lm), want)


def reference_lm_grads_one(lm) -> dict:
    """The plain autograd gradient of lm_loss on batch (0, 0), from a copy of lm without a reducer."""
    import copy
    plain = copy.deepcopy(lm)
    for p in plain.parameters():
        p.grad = None
    lm_loss(plain, lm_batch(0, 0)).backward()
    return grads_of(plain)


def test_buckets_reverse_order_dedupe_and_size():
    """Buckets list each trainable parameter once (tied lm_head = embedding), last layer first."""
    lm = tiny_lm(seed=0)
    named = list(lm.named_parameters())
    cap = int(SMALL_BUCKET_MB * 2**20)
    buckets = make_buckets(list(reversed(named)), cap)
    assert [n for b in buckets for n in b.names] == [n for n, _ in reversed(named)]
    assert sum(b.numel for b in buckets) == sum(p.numel() for p in lm.parameters())
    assert buckets[-1].names[-1] == "model.embed_tokens.weight"  # the embedding's gradient comes last
    for b in buckets:  # a bucket exceeds the cap only by its last parameter
        assert b.nbytes - b.params[-1].numel() * 4 < cap


@pytest.fixture
def one_rank_group():
    """A real gloo process group of size 1 in this process: the reducer's hooks and launches
    run for real (SUM over one rank is the identity), without the cost of subprocesses."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


def test_second_backward_after_launch_is_an_error(one_rank_group):
    """Two backward passes under set_sync(True) would change gradients already sent: refuse."""
    lm = tiny_lm(seed=0)
    reducer = InstrumentedGradReducer(lm, one_rank_group, bucket_mb=SMALL_BUCKET_MB)
    lm_loss(lm, lm_batch(0, 0)).backward()
    with pytest.raises(RuntimeError, match="after its bucket was all-reduced"):
        lm_loss(lm, lm_batch(0, 1)).backward()


def test_hooks_fire_under_gradient_checkpointing(one_rank_group):
    """Recomputation inside backward does not hide or repeat a parameter's gradient-ready hook."""
    lm = tiny_lm(seed=0)
    lm.train()
    lm.gradient_checkpointing = True
    reducer = InstrumentedGradReducer(lm, one_rank_group, bucket_mb=SMALL_BUCKET_MB)
    lm_loss(lm, lm_batch(0, 0)).backward()
    assert reducer.buckets_in_backward == len(reducer.buckets)
    reducer.wait()
    assert set(reducer.reduce_counts.values()) == {1}


def test_no_overlap_mode_launches_everything_in_wait(one_rank_group):
    lm = tiny_lm(seed=0)
    reducer = InstrumentedGradReducer(lm, one_rank_group, bucket_mb=SMALL_BUCKET_MB, overlap=False, timing=True)
    lm_loss(lm, lm_batch(0, 0)).backward()
    before = grads_of(lm)
    reducer.wait()
    assert reducer.buckets_in_backward == 0 and reducer.buckets_in_wait == len(reducer.buckets)
    assert_grads_close(grads_of(lm), before)  # the mean over one rank is the gradient itself
    assert reducer.last_wait_s > 0 and reducer.wait_s == reducer.last_wait_s


if __name__ == "__main__":  # a rank launched by `launch`: python test_distributed.py OUT_DIR SCENARIO
    run_rank(sys.argv[1], sys.argv[2])
