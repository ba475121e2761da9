"""What a first GPU run would meet, shown on the CPU (issue #27): the one-process --fsdp device,
the precomputed reference freed, rank 0's host memory while saving a sharded checkpoint, the
host syncs of a training step, the packed mask built once, the reference weights hashed once.

Host syncs cannot be seen on a CPU, but the calls that cause them can: SyncCounter counts, inside
one train_step, every call that on CUDA makes the host wait for the GPU (a result sized or read on
the host: nonzero, bincount, boolean-mask indexing, .item(), .tolist(), bool()/float() of a tensor;
a blocking copy: .to(device) without non_blocking, torch.tensor(..., device=...), a list used as an
index). The step may wait once, after backward, to read its metrics; the forward and the backward
must not wait at all, or the GPU runs dry while the host catches up.
"""
import gc
import warnings
import os
import sys
import weakref
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

import minialign
from minialign import dpo, reference_cache
from minialign.collate import TokenizedPair
from minialign.config import ModelConfig
from minialign.distributed import DistEnv, init_distributed
from minialign.dpo import DPOObjective, LiveReference, PrecomputedReference
from minialign.model import CausalLM, DecoderLayer, RewardModel, attend
from minialign.reducer import GradReducer
from minialign.reward import RewardObjective
from minialign.packing import make_batch
from minialign.train import build_optimizer, train_step

MINIALIGN_DIR = os.path.dirname(minialign.__file__)
CFG = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture
def one_rank_group():
    """A real gloo process group of size 1 in this process (no subprocess): the reducer's hooks and
    launches, FSDP's collectives and the metrics' all-reduce all run for real."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistEnv(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


def pairs(n=4, seed=0):
    """n pairs with prompts and answers of different lengths (so rows are padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 64, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(ids(3 + i), ids(2 + i % 3), ids(4 - i % 2), line=i + 1) for i in range(n)]


# ------------------------------------------------------------------------------ 1. one-process --fsdp on CUDA

@pytest.mark.filterwarnings("ignore:Attempted to get default timeout for nccl")
def test_one_process_fsdp_group_gets_an_indexed_cuda_device(monkeypatch):
    """torch believes one CUDA device exists; init_distributed (no torchrun) then fsdp's group of one.
    init_process_group refuses device_id=cuda without an index ("Please use a device_id with index",
    distributed_c10d.py) before it creates any backend: that refusal was --fsdp's certain crash."""
    from minialign.fsdp import ensure_process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    env = init_distributed()
    assert env.device == torch.device("cuda", 0)
    seen = []
    real = dist.init_process_group

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_id"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    try:
        ensure_process_group(env)
    except (RuntimeError, ValueError) as e:  # this CPU build has no NCCL: the backend itself cannot start
        assert "device_id" not in str(e), e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == [torch.device("cuda", 0)]


def test_one_visible_gpu_per_process_is_used_whatever_local_rank(monkeypatch):
    """SLURM may give each of 8 processes its own GPU (CUDA_VISIBLE_DEVICES): LOCAL_RANK 5 sees one."""
    from minialign.distributed import cuda_index
    from minialign.errors import UserError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cuda_index(5) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert cuda_index(3) == 3
    with pytest.raises(UserError, match="LOCAL_RANK 5 but this node sees 4 GPU"):
        cuda_index(5)


# ------------------------------------------------------------------------------ 5. host syncs in a step

class SyncCounter(TorchFunctionMode):
    """Counts the calls that would make the host wait for a CUDA device, by phase (self.phase)."""

    SIZED_ON_HOST = {"nonzero", "bincount", "masked_select", "unique", "item", "tolist", "__bool__", "__float__",
                     "__int__", "__index__", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.phase, self.calls = "outside", []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.waits(name, args, kwargs):
            self.calls.append((self.phase, name))
        return func(*args, **kwargs)

    @staticmethod
    def waits(name, args, kwargs) -> bool:
        if name in SyncCounter.SIZED_ON_HOST:
            return True
        if name == "repeat_interleave":  # without output_size the result's size is read on the host
            return torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("repeats")) and "output_size" not in kwargs
        if name in ("__getitem__", "__setitem__"):  # a list index is copied to the GPU; a bool mask sized
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, list) or (torch.is_tensor(i) and i.dtype == torch.bool) for i in parts)
        if name == "to":  # a copy to a device, blocking unless non_blocking (torch's own calls, e.g. in
            # clip_grad_norm_, move a device's values to that same device: not counted)
            names_device = any(isinstance(a, (str, torch.device)) for a in args[1:]) or "device" in kwargs
            return names_device and not kwargs.get("non_blocking", False) and called_from_minialign()
        if name in ("tensor", "as_tensor"):
            return kwargs.get("device") is not None
        return False


def called_from_minialign() -> bool:
    """Whether the Python code that made the intercepted call is minialign's."""
    frame = sys._getframe(1)
    while frame and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename == torch.overrides.__file__):
        frame = frame.f_back
    return frame is not None and MINIALIGN_DIR in frame.f_code.co_filename


def counted_step(model, objective, batches, grad_sync, env):
    """One train_step, the counter's phase set to forward / backward / step around its parts."""
    counter = SyncCounter()

    def loss(m, batch):
        counter.phase = "forward"
        out = objective.loss(m, batch)
        counter.phase = "backward"  # what runs next is (losses.sum() / pairs).backward()
        return out

    real_wait = grad_sync.wait

    def wait():
        counter.phase = "step"  # the reduction's end, clipping, the metrics, AdamW
        real_wait()

    grad_sync.wait = wait
    # The reducer's launches run in gradient hooks, inside autograd's engine, which a mode entered
    # around the step does not reach: count in them too.
    real_launch = grad_sync._launch

    def launch(bucket):
        with counter:
            real_launch(bucket)

    grad_sync._launch = launch
    optimizer = build_optimizer(model, 1e-3, 0.0)
    with counter:
        counting = SimpleNamespace(loss=loss, summarize=objective.summarize, headline=objective.headline)
        sums = train_step(model, counting, batches, optimizer, grad_sync, 1e-3, 1.0,
                          torch.autocast("cpu", enabled=False), env)
    return counter.calls, sums


@pytest.mark.parametrize("kind", ["dpo packed, live reference", "dpo unpacked, precomputed reference",
                                  "reward packed", "reward unpacked"])
def test_no_host_sync_in_forward_and_backward_one_in_the_step(one_rank_group, kind):
    """Two micro-steps, gradients in GradReducer's buckets (a group of one: the hooks, flags and
    all-reduces run). Expected: nothing in forward and backward; in the step, one: the metrics
    reach the host (all_reduce_sums' .tolist()), which every rank needs to stop together before a
    non-finite step."""
    env = one_rank_group
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(CFG)
    packed = "unpacked" not in kind
    items = pairs(4)
    batches = [make_batch(items, ids, 0, "train", env.device, packed) for ids in ([0, 1], [2, 3])]
    if kind.startswith("dpo"):
        model = CausalLM(cfg)
        if "live" in kind:
            reference = LiveReference(CausalLM(cfg).eval().requires_grad_(False))
        else:
            reference = PrecomputedReference({"train": torch.randn(len(items), 2)}, env.device)
        objective = DPOObjective(reference=reference)
    else:
        model, objective = RewardModel(cfg), RewardObjective()
    grad_sync = GradReducer(model, env, bucket_mb=0.01)  # several buckets
    calls, sums = counted_step(model, objective, batches, grad_sync, env)
    assert len(grad_sync.buckets) > 1
    assert [c for c in calls if c[0] in ("forward", "backward")] == [], calls
    assert calls == [("step", "tolist")], calls
    assert sums["pairs"] == 4


# ------------------------------------------------------------------------------ 6. the packed mask

def test_packed_mask_is_built_once_per_forward_additive_padded():
    """Every layer gets the same tensor: the packed boolean mask as 0 / -inf in the dtype attention
    computes in (fp32; bf16 under autocast), its rows a multiple of 8 elements apart, as SDPA's
    memory-efficient kernel wants them, so that SDPA neither converts nor pads it again in every layer."""
    from minialign.packing import collate_packed, packed_attention_mask

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf_dict(CFG))
    batch = collate_packed(pairs(3), pad_token_id=0)
    T = batch.input_ids.shape[1]
    assert T % 8 != 0  # the padding of each row is to be shown
    seen = []
    real = DecoderLayer.forward

    def spy(self, x, **kwargs):
        seen.append(kwargs["mask"])
        return real(self, x, **kwargs)

    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        seen.clear()
        with mock.patch.object(DecoderLayer, "forward", spy), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            minialign.packing.answer_logps(model, batch)
        assert len(seen) == 2 and seen[0] is seen[1]
        mask = seen[0]
        assert mask.dtype == dtype and mask.shape == (3, 1, T, T) and mask.stride(-2) % 8 == 0
        visible = packed_attention_mask(batch)  # (B, 1, T, T) bool
        assert torch.equal(mask == 0, visible) and bool(torch.isneginf(mask[~visible]).all())


def test_additive_mask_attends_as_the_boolean_one():
    """SDPA with the additive mask equals SDPA with the boolean one (grouped heads, a random mask
    in which every query sees itself)."""
    from minialign.model import additive_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    mask = (torch.rand(2, 1, 5, 5, generator=g) > 0.5) | torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(attend(q, k, v, additive_mask(mask, torch.float32)), attend(q, k, v, mask),
                               atol=1e-6, rtol=0)


def test_batches_are_padded_to_8_on_cuda_by_default():
    from minialign.packing import pad_multiple

    assert pad_multiple(None, torch.device("cuda", 0)) == 8
    assert pad_multiple(None, torch.device("cpu")) is None
    assert pad_multiple(16, torch.device("cuda", 0)) == 16


# ------------------------------------------------------------------------------ 2. the precomputed reference freed

@pytest.fixture
def dpo_setup(tiny_world, tmp_path):
    """train_dpo.py's arguments, tokenizer and tokenized pairs for the tiny world (no process group)."""
    import train_dpo
    from minialign.cli import data_config
    from minialign.prepare import prepare_pairs

    def make(*extra):
        args = train_dpo.parse_args(["--model", str(tiny_world["model"]), "--data", str(tiny_world["data"]),
                                     "--output", str(tmp_path / "run"), "--max_length", "64",
                                     "--max_prompt_length", "32", "--batch_size", "8", "--precompute_ref", *extra])
        tokenizer = minialign.load_tokenizer(args.model)
        train_items, eval_items = prepare_pairs(tokenizer, data_config(args), DistEnv(0, 1, 0, torch.device("cpu")))
        return args, tokenizer, train_items, eval_items
    return make


def test_precomputed_sharded_reference_is_freed_at_once(one_rank_group, dpo_setup, monkeypatch):
    """--fsdp --precompute_ref: once the tables are built, nothing holds the sharded reference.
    FSDP2 ties a sharded module into reference cycles, so without an explicit collection it lived on
    until the cyclic GC happened to run (disabled here, so that luck cannot free it)."""
    import train_dpo

    args, tokenizer, train_items, eval_items = dpo_setup("--fsdp", "--dtype", "fp32")
    built = []
    real = train_dpo.load_sharded

    def spy(*a, **k):
        model = real(*a, **k)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(train_dpo, "load_sharded", spy)
    gc.collect()
    gc.disable()
    try:
        reference = train_dpo.load_reference(args, one_rank_group, "fp32", tokenizer, train_items, eval_items)
        assert len(built) == 1 and built[0]() is None
    finally:
        gc.enable()
    batch = make_batch(train_items, [0, 1], tokenizer.pad_token_id, "train", "cpu", True)
    chosen, rejected = reference(batch)  # the lookup still works without the model
    assert chosen.shape == rejected.shape == (2,)


# ------------------------------------------------------------------------------ 8. the weights hashed once, on rank 0

def test_reference_weights_hashed_once_by_rank_0(dpo_setup, monkeypatch):
    """Both splits' cache keys come from one read of the reference weights; a rank other than 0
    reads none of them (rank 0's digest arrives by broadcast)."""
    import builtins

    import train_dpo
    from minialign.reference_cache import weights_digest

    args, tokenizer, train_items, eval_items = dpo_setup("--dtype", "fp32")
    assert train_items and eval_items
    reads = []
    real_open = builtins.open

    def counting_open(file, mode="r", *a, **k):
        if str(file).endswith(".safetensors") and "r" in mode:
            reads.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", counting_open)
    train_dpo.load_reference(args, DistEnv(0, 1, 0, torch.device("cpu")), "fp32", tokenizer, train_items, eval_items)
    assert reads == [str(args.model) + "/model.safetensors"]  # once, not once per split
    reads.clear()
    monkeypatch.setattr(reference_cache, "broadcast_object", lambda obj, env: "rank 0's digest" if env.rank else obj)
    assert weights_digest(args.model, DistEnv(1, 2, 1, torch.device("cpu"))) == "rank 0's digest"
    assert reads == []


# ------------------------------------------------------------------------------ 3. rank 0's host memory while saving

def live_cpu_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process, each storage once."""
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on torch.distributed's deprecated reduce_op warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.device.type == "cpu":
                try:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # a DTensor wrapper or a freed storage: nothing of its own
                    continue
    return sum(storages.values())


def test_sharded_checkpoint_save_adds_no_copy_of_the_optimizer_state(one_rank_group, monkeypatch, tmp_path):
    """--fsdp's save on gloo: rank 0's live CPU bytes above those before the save, at its peak (the
    file layout just made, the gathered state still held) and while the optimizer file is written.
    On one rank the gathered full state is the shards themselves (nothing gathered to hold), so the
    save should add nothing; flatten_adamw_state's copy of AdamW's moments added 8 bytes per
    parameter. (Measured the same way on 2 gloo ranks: rank 0 adds 12 bytes per parameter, the
    gathered weights and AdamW state; 20 with the copy.)"""
    from minialign import resume
    from minialign.fsdp import shard

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict({**CFG, "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256})
    model = shard(CausalLM(cfg), one_rank_group, "fp32")
    n = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, 1e-3, 0.0)
    model(torch.randint(0, 1000, (2, 8))).sum().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    before, during = live_cpu_bytes(), []
    real_save = resume.save_tensors

    def measuring_save(tensors, path, *a, **k):
        during.append(live_cpu_bytes())
        return real_save(tensors, path, *a, **k)

    class Run:  # the three things save_training_checkpoint asks of a RunFolder
        checkpoints, run_id = tmp_path / "checkpoints", "test"

        def checkpoint_name(self, step):
            return f"step-{step:06d}"

        def add_checkpoint(self, name, keep):
            pass

    real_flatten = resume.flatten_adamw_state

    def measuring_flatten(by_name):
        out = real_flatten(by_name)
        during.append(live_cpu_bytes())  # the gathered state and the file's layout of it, both alive
        return out

    monkeypatch.setattr(resume, "save_tensors", measuring_save)
    monkeypatch.setattr(resume, "flatten_adamw_state", measuring_flatten)
    resume.save_training_checkpoint(Run(), 1, model, optimizer, None, {}, 0, one_rank_group)
    assert len(during) == 2 and (tmp_path / "checkpoints" / "step-000001" / resume.OPTIMIZER_FILE).is_file()
    added = [(b - before) / n for b in during]
    assert max(added) < 0.5, f"{added} bytes per parameter added (after flattening, while writing)"
