"""Logits against golden numbers recorded once with Hugging Face transformers 5.24.

tests/fixtures/make_golden_logits.py built each tiny random model with transformers, saved
it, and recorded its logits (or reward-model scores) for an unpadded batch and for the same
rows right- and left-padded, plus 8 greedy tokens. See tests/fixtures/README.md."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minialign
from minialign.generate import generate_tokens
from minialign.model import RewardModel

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CAUSAL = ["qwen2_tied", "qwen2_untied", "qwen3", "llama", "llama_bias"]
CASES = ["unpadded", "right_padded", "left_padded"]
ATOL = 1e-4


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(name, case):
    model = minialign.load_model(GOLDEN / name).eval()
    ref = load_file(str(GOLDEN / name / "expected.safetensors"))
    ids, mask = ref[f"{case}.input_ids"], ref[f"{case}.attention_mask"]
    with torch.no_grad():
        logits = model(ids, mask)
    real = mask.bool()  # padding positions are unspecified on both sides
    diff = (logits[real] - ref[f"{case}.logits"][real]).abs().max().item()
    assert diff <= ATOL, f"{name}/{case}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", CAUSAL)
def test_greedy_tokens_match_transformers(name):
    """8 greedy tokens with our KV cache equal transformers' greedy ids (no EOS stop)."""
    model = minialign.load_model(GOLDEN / name)
    ref = load_file(str(GOLDEN / name / "expected.safetensors"))
    prompt = ref["greedy.prompt_ids"][0].tolist()
    out, _ = generate_tokens(model, [prompt], eos_token_ids=[], pad_token_id=0, max_new_tokens=8)
    assert prompt + out[0] == ref["greedy.output_ids"][0].tolist()


@pytest.mark.parametrize("case", CASES)
def test_reward_scores_match_transformers(case):
    model = minialign.load_model(GOLDEN / "qwen2_reward").eval()
    assert isinstance(model, RewardModel)
    ref = load_file(str(GOLDEN / "qwen2_reward" / "expected.safetensors"))
    with torch.no_grad():
        scores = model(ref[f"{case}.input_ids"], ref[f"{case}.attention_mask"])
    torch.testing.assert_close(scores, ref[f"{case}.scores"], atol=ATOL, rtol=0)
