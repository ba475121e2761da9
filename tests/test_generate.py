"""Generation against invariants: the KV cache changes speed, not tokens; batching and
padding change nothing; each row stops at its own EOS; seeded sampling repeats."""
import torch

import minialign
from minialign.generate import generate_tokens, sample_next
from minialign.config import ModelConfig
from minialign.model import CausalLM

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Hello!"}],
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
]


def tiny_lm(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    m = CausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # peaky distributions: greedy ties are unlikely
    return m


def test_greedy_with_cache_equals_full_recompute(tiny_tokenizer_dir):
    tok = minialign.load_tokenizer(tiny_tokenizer_dir)
    m = tiny_lm(len(tok))
    cached = minialign.generate(m, tok, PROMPTS, max_new_tokens=12)
    full = minialign.generate(m, tok, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached.token_ids == full.token_ids
    assert cached.texts == full.texts
    assert all(len(t) > 0 for t in cached.token_ids)


def test_batched_equals_one_by_one(tiny_tokenizer_dir):
    """Left padding must not change any row's greedy tokens."""
    tok = minialign.load_tokenizer(tiny_tokenizer_dir)
    m = tiny_lm(len(tok), seed=1)
    batched = minialign.generate(m, tok, PROMPTS, max_new_tokens=10)
    single = minialign.generate(m, tok, PROMPTS, max_new_tokens=10, batch_size=1)
    assert batched.token_ids == single.token_ids


def test_each_row_stops_at_its_own_eos():
    """Declare the 4th greedy token of row 0 an EOS: row 0 stops there (EOS excluded, finished),
    row 1 runs to max_new_tokens unless it meets that token itself."""
    m = tiny_lm(50, seed=2)
    prompts = [[5, 6, 7, 8], [9, 10]]
    free, _ = generate_tokens(m, prompts, eos_token_ids=[], pad_token_id=0, max_new_tokens=8)
    eos = free[0][3]
    out, finished = generate_tokens(m, prompts, eos_token_ids=[eos], pad_token_id=0, max_new_tokens=8)
    assert out[0] == free[0][: free[0].index(eos)] and finished[0]
    cut1 = free[1].index(eos) if eos in free[1] else 8
    assert out[1] == free[1][:cut1] and finished[1] == (eos in free[1])


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(tiny_tokenizer_dir):
    tok = minialign.load_tokenizer(tiny_tokenizer_dir)
    m = tiny_lm(len(tok), seed=3)
    a = minialign.generate(m, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    b = minialign.generate(m, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    greedy = minialign.generate(m, tok, PROMPTS, max_new_tokens=10)
    k1 = minialign.generate(m, tok, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=3)
    assert k1.token_ids == greedy.token_ids


def test_top_p_keeps_the_smallest_nucleus():
    """probs [0.5, 0.3, 0.15, 0.05]: top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), never 2 or 3."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, None, 0.75, g)
    assert set(draws.tolist()) == {0, 1}
    share0 = (draws == 0).float().mean().item()
    assert abs(share0 - 0.5 / 0.8) < 0.05  # renormalised within the nucleus


def test_sampling_is_seeded_per_prompt(tiny_tokenizer_dir):
    """Each row draws from its own generator (generate.row_seeds): a prompt's sampled answer is the
    same whether it shares its batch or not, and a slice of the job given its rows' seeds
    (what one rank of several generates) reproduces those rows of the whole job exactly.
    (Batched and one-by-one logits differ in the last bits at most; a draw would change only if
    its uniform number fell within that distance of a bucket edge, as in the greedy test above.)"""
    from minialign.generate import encode_prompts, row_seeds

    tok = minialign.load_tokenizer(tiny_tokenizer_dir)
    m = tiny_lm(len(tok), seed=4)
    prompts = PROMPTS * 2  # repeated prompts must still get their own draws
    together = minialign.generate(m, tok, prompts, max_new_tokens=10, temperature=1.0, seed=11)
    alone = minialign.generate(m, tok, prompts, max_new_tokens=10, temperature=1.0, seed=11, batch_size=1)
    assert together.token_ids == alone.token_ids
    assert together.token_ids[:3] != together.token_ids[3:]  # the copies were sampled independently
    ids = encode_prompts(tok, prompts)
    part, _ = generate_tokens(m, ids[2:5], tok.eos_token_ids, tok.pad_token_id, max_new_tokens=10,
                              temperature=1.0, seeds=row_seeds(11, 3, start=2))
    assert part == together.token_ids[2:5]
    other = minialign.generate(m, tok, prompts, max_new_tokens=10, temperature=1.0, seed=12)
    assert other.token_ids != together.token_ids


def test_greedy_leaves_the_global_generator_alone(tiny_tokenizer_dir):
    tok = minialign.load_tokenizer(tiny_tokenizer_dir)
    m = tiny_lm(len(tok), seed=5)
    state = torch.get_rng_state()
    minialign.generate(m, tok, PROMPTS, max_new_tokens=4)
    assert torch.equal(torch.get_rng_state(), state)  # saved generator state, compared bit for bit
