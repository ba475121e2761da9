"""The causal LM against invariants: padding, KV cache, checkpointing, save/load, clear errors.

Golden logits from the reference implementation are in test_golden.py."""
import json

import pytest
import torch

import minialign
from minialign.checkpoint import read_state_dict, save_model
from minialign.config import ModelConfig
from minialign.errors import UserError
from minialign.model import CausalLM, KVCache, RewardModel, last_token_index


def tiny_config(model_type="qwen2", **over):
    d = dict(
        model_type=model_type, vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, max_position_embeddings=128,
    )
    if model_type == "qwen3":
        d["head_dim"] = 16
    d.update(over)
    return ModelConfig.from_hf_dict(d)


def random_model(model_type="qwen2", seed=0, **over):
    torch.manual_seed(seed)
    m = CausalLM(tiny_config(model_type, **over))
    with torch.no_grad():  # larger weights than the init so that errors in masking show up
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    return m.eval()


ARCHS = [("qwen2", {}), ("qwen2", {"tie_word_embeddings": False}), ("qwen3", {}), ("llama", {"attention_bias": True})]


@pytest.mark.parametrize("arch,over", ARCHS)
def test_padded_equals_unpadded(arch, over):
    """Each row of a right- or left-padded batch equals that row run alone, at its real positions."""
    m = random_model(arch, **over)
    torch.manual_seed(1)
    rows = [torch.randint(3, 101, (n,)) for n in (7, 4, 1)]
    alone = [m(r[None])[0] for r in rows]
    T = 7
    for side in ("right", "left"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            ids[i, sl], mask[i, sl] = r, 1
        out = m(ids, mask)
        assert torch.isfinite(out).all()
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            torch.testing.assert_close(out[i, sl], alone[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,over", ARCHS)
def test_kv_cache_decoding_equals_full_forward(arch, over):
    """Prefill on a left-padded prompt then feed tokens one at a time: the logits of every new
    token equal those of one full forward over prompt + new tokens."""
    m = random_model(arch, **over)
    torch.manual_seed(2)
    ids = torch.randint(3, 101, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded
    full = m(ids, mask)
    P = 5
    cache = KVCache(m.config, 2, 9, "cpu", torch.float32)
    step = m(ids[:, :P], mask[:, :P], kv_cache=cache)
    torch.testing.assert_close(step, full[:, :P], atol=1e-5, rtol=1e-5)
    for t in range(P, 9):
        step = m(ids[:, t : t + 1], mask[:, : t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_decoding_folds_query_groups_instead_of_repeating_the_cache(monkeypatch):
    """GQA decoding (4 query heads on 2 key/value heads, one row left-padded) reads the cache in
    place: every attention call during decoding gets the cache's own (B, K, S, D) tensors, never
    a (B, H, S, D) repeat, and each step's logits equal those of decoding with the repeated cache
    (the old path, model.attend: SDPA's enable_gqa on CPU, a repeat on CUDA) within 1e-5."""
    import minialign.model as model_module

    m = random_model("qwen2")
    torch.manual_seed(4)
    ids = torch.randint(3, 101, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0

    def decode():
        cache = KVCache(m.config, 3, 10, "cpu", torch.float32)
        out = [m(ids[:, :6], mask[:, :6], kv_cache=cache)[:, -1]]
        out += [m(ids[:, t:t + 1], mask[:, :t + 1], kv_cache=cache)[:, 0] for t in range(6, 10)]
        return torch.stack(out), cache

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[1], k.shape[1], k.untyped_storage().data_ptr()))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    folded, cache = decode()
    storages = {t.untyped_storage().data_ptr() for t in cache.k}
    assert len(seen) == 5 * 2 and all(heads == kv == 2 and ptr in storages for heads, kv, ptr in seen)
    monkeypatch.setattr(model_module, "attend_folded", model_module.attend)  # the repeat-per-head path
    repeated, _ = decode()
    torch.testing.assert_close(folded, repeated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reward", [False, True])
def test_gradient_checkpointing_same_gradients(reward):
    """Recomputing each layer in backward changes memory, not arithmetic: identical gradients."""
    torch.manual_seed(3)
    cfg = tiny_config("qwen3")
    m = RewardModel(cfg) if reward else CausalLM(cfg)
    m.train()
    ids = torch.randint(3, 101, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

    def grads(ckpt):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        out = m(ids, mask)
        (out.float().pow(2).mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    g0, g1 = grads(False), grads(True)
    for n in g0:  # the same kernels run again in backward; a tolerance, since torch does not promise bits
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5, msg=n)


def test_reward_read_at_last_real_token():
    """The reward of a padded row equals the reward of the row alone (right and left padding)."""
    torch.manual_seed(4)
    rm = RewardModel(tiny_config()).eval()
    a, b = torch.randint(3, 101, (5,)), torch.randint(3, 101, (3,))
    ra, rb = rm(a[None])[0], rm(b[None])[0]
    right = torch.stack([a, torch.cat([b, torch.zeros(2, dtype=torch.long)])])
    right_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    torch.testing.assert_close(rm(right, right_mask), torch.stack([ra, rb]), atol=1e-5, rtol=1e-5)
    left = torch.stack([a, torch.cat([torch.zeros(2, dtype=torch.long), b])])
    left_mask = torch.tensor([[1] * 5, [0] * 2 + [1] * 3])
    torch.testing.assert_close(rm(left, left_mask), torch.stack([ra, rb]), atol=1e-5, rtol=1e-5)
    assert last_token_index(left_mask).tolist() == [4, 4]
    assert last_token_index(right_mask).tolist() == [4, 2]


@pytest.mark.parametrize("arch,over", ARCHS + [("qwen2", {"num_hidden_layers": 0})])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_reward_last_layer_only_at_read_position(arch, over, side, ckpt):
    """RewardModel runs its last layer's queries and MLP only at the last real token. Against the
    slow way (every position through every layer, then pick the last real token): same rewards,
    same gradients for every parameter."""
    torch.manual_seed(5)
    rm = RewardModel(tiny_config(arch, **over))
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    rm.train()
    rm.gradient_checkpointing = ckpt
    lengths, T = [7, 4, 1], 7
    ids = torch.randint(3, 101, (3, T))
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, slice(0, n) if side == "right" else slice(T - n, T)] = 1

    def slow(ids, mask):
        h = rm.model(ids, mask)  # (B, T, C): all positions
        return rm.score(h[torch.arange(3), last_token_index(mask)]).squeeze(-1)

    results = []
    for f in (rm, slow):
        rm.zero_grad()
        r = f(ids, mask)
        (r * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((r.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}))
    (r_fast, g_fast), (r_slow, g_slow) = results
    torch.testing.assert_close(r_fast, r_slow, atol=1e-5, rtol=1e-5)
    assert g_fast.keys() == g_slow.keys()
    for n in g_slow:
        torch.testing.assert_close(g_fast[n], g_slow[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch,over", ARCHS)
def test_ready_4d_mask_with_position_ids_equals_the_2d_mask(arch, over):
    """The same left-padded batch given as a (B, S) padding mask, and as a ready boolean (B, 1, T, T)
    mask written out here (causal, real keys only, each query sees itself) with the positions
    counted by hand: the same logits at every real token."""
    m = random_model(arch, **over)
    torch.manual_seed(6)
    ids = torch.randint(3, 101, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    ready = torch.ones(6, 6, dtype=torch.bool).tril() & mask.bool()[:, None, :]  # (B, T, T)
    ready |= torch.eye(6, dtype=torch.bool)
    out_2d, out_4d = m(ids, mask), m(ids, ready[:, None], position_ids=positions)
    real = mask.bool()
    torch.testing.assert_close(out_4d[real], out_2d[real], atol=1e-5, rtol=1e-5)


def test_ready_mask_errors_are_clear():
    m = random_model("qwen2")
    ids = torch.randint(3, 101, (2, 4))
    ready = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    positions = torch.arange(4).expand(2, 4)
    with pytest.raises(ValueError, match="needs position_ids"):
        m(ids, ready)
    with pytest.raises(ValueError, match="must be bool of shape"):
        m(ids, ready.float(), position_ids=positions)
    with pytest.raises(ValueError, match="must be bool of shape"):
        m(ids, ready[:, :, :3], position_ids=positions)
    with pytest.raises(ValueError, match="do not combine"):
        m.model(ids, kv_cache=KVCache(m.config, 2, 4, "cpu", torch.float32), read_at=torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("arch,over", ARCHS)
def test_save_load_round_trip_exact(tmp_path, arch, over):
    m = random_model(arch, **over)
    save_model(m, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["architectures"][0].endswith("ForCausalLM")
    m2 = minialign.load_model(tmp_path / "ckpt")
    for (n, p), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    if m.config.tie_word_embeddings:
        assert m2.lm_head.weight is m2.model.embed_tokens.weight
        assert "lm_head.weight" not in read_state_dict(tmp_path / "ckpt")
    ids = torch.randint(3, 101, (2, 5))
    # The saved tensors are equal bit for bit (above); two model objects' forwards are only
    # promised to agree to rounding (kernels may depend on memory layout).
    torch.testing.assert_close(m(ids), m2.eval()(ids), atol=1e-6, rtol=1e-5)


def test_reward_model_round_trip_and_hf_layout(tmp_path):
    torch.manual_seed(5)
    rm = RewardModel(tiny_config(pad_token_id=0))
    save_model(rm, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == 0
    assert "score.weight" in read_state_dict(tmp_path / "rm")
    rm2 = minialign.load_model(tmp_path / "rm")
    assert isinstance(rm2, RewardModel)
    for (n, p), (n2, p2) in zip(rm.state_dict().items(), rm2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n  # saved tensors: bit for bit
    ids = torch.randint(3, 101, (2, 5))
    torch.testing.assert_close(rm.eval()(ids), rm2.eval()(ids), atol=1e-6, rtol=1e-5)  # computed: to rounding


def test_causal_lm_checkpoint_as_reward_backbone(tmp_path):
    """load_model(..., reward=True) on a causal LM: same backbone, fresh score head, no lm_head."""
    m = random_model("llama")
    save_model(m, tmp_path / "lm")
    rm = minialign.load_model(tmp_path / "lm", reward=True)
    assert isinstance(rm, RewardModel) and rm.score.weight.shape == (1, 32)
    for k, v in m.model.state_dict().items():
        assert torch.equal(v, rm.model.state_dict()[k])


def test_sharded_checkpoint_loads(tmp_path):
    m = random_model("qwen2", tie_word_embeddings=False)
    save_model(m, tmp_path / "sharded", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    m2 = minialign.load_model(tmp_path / "sharded")
    for (n, p), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n  # saved tensors: bit for bit
    ids = torch.randint(3, 101, (1, 6))
    torch.testing.assert_close(m(ids), m2.eval()(ids), atol=1e-6, rtol=1e-5)  # computed: to rounding


def test_dtype_and_bf16_forward(tmp_path):
    m = random_model("qwen2")
    save_model(m, tmp_path / "c")
    mb = minialign.load_model(tmp_path / "c", dtype="bf16")
    assert next(mb.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, 101, (2, 6))
    out = mb.eval()(ids)
    assert out.dtype == torch.bfloat16
    # bf16 has ~3 significant digits: logits agree with fp32 to a loose tolerance only
    assert (out.float() - m(ids)).abs().max() < 0.25 * m(ids).abs().max()


def _write_config(path, **over):
    m = random_model("qwen2")
    save_model(m, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(over)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "over,key",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_config_is_a_clear_error(tmp_path, over, key):
    _write_config(tmp_path / "c", **over)
    with pytest.raises(ValueError, match=key):
        minialign.load_model(tmp_path / "c")


def test_missing_unexpected_misshaped_tensors_are_named(tmp_path):
    from safetensors.torch import save_file

    m = random_model("qwen2", tie_word_embeddings=False)
    good = {k: v.contiguous() for k, v in m.state_dict().items()}
    for name, state, err, pattern in [
        # User mistakes are UserErrors (a ValueError), since issue 16; they were KeyErrors before.
        ("missing", {k: v for k, v in good.items() if k != "model.norm.weight"}, UserError, "model.norm.weight"),
        ("unexpected", {**good, "model.extra.weight": torch.zeros(1)}, UserError, "model.extra.weight"),
        ("shape", {**good, "model.norm.weight": torch.zeros(31)}, UserError, "model.norm.weight"),
    ]:
        d = tmp_path / name
        save_model(m, d)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(err, match=pattern):
            minialign.load_model(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        minialign.load_model(tmp_path / "nowhere")


def test_tied_checkpoint_with_explicit_lm_head_loads(tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: accepted, the tie is kept."""
    from safetensors.torch import save_file

    m = random_model("llama")
    save_model(m, tmp_path / "c")
    state = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    save_file(state, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    m2 = minialign.load_model(tmp_path / "c")
    assert m2.lm_head.weight is m2.model.embed_tokens.weight


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """If writing the weights fails, the folder still holds the previous complete checkpoint."""
    import minialign.checkpoint as ck

    m = random_model("qwen2")
    save_model(m, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(random_model("qwen2", seed=9), tmp_path / "c")
    after = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    assert before == after
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left behind
