"""Llama 3 and linear RoPE scaling: logits against golden numbers recorded once with transformers
5.24 (tests/fixtures/make_golden_logits.py: llama_rope_llama3 written as a 5.x config with
`rope_parameters`, llama_rope_linear as a 4.x config with `rope_scaling`), the frequency rule
against a slow per-frequency loop written from Meta's reference code, and config parsing."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minialign
from minialign.config import ModelConfig, RopeScaling
from minialign.generate import generate_tokens
from minialign.model import rope_inverse_frequencies

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
SCALED = ["llama_rope_llama3", "llama_rope_linear"]
ATOL = 1e-4  # as tests/test_golden.py

# Llama-3.2-1B-Instruct's published config.json (transformers 4.x spelling), the parts that matter here.
LLAMA_3_2_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=True,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("case", ["unpadded", "right_padded", "left_padded", "long"])
def test_scaled_rope_logits_match_transformers(name, case):
    """`long` holds two rows of 64 tokens: the recording script checked that the same weights with
    plain RoPE give logits up to 4.5 (llama3) / 4.3 (linear) away there, so ignoring the scaling fails."""
    model = minialign.load_model(GOLDEN / name).eval()
    ref = load_file(str(GOLDEN / name / "expected.safetensors"))
    ids, mask = ref[f"{case}.input_ids"], ref[f"{case}.attention_mask"]
    with torch.no_grad():
        logits = model(ids, mask)
    real = mask.bool()
    diff = (logits[real] - ref[f"{case}.logits"][real]).abs().max().item()
    assert diff <= ATOL, f"{name}/{case}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", SCALED)
def test_scaled_rope_greedy_tokens_match_transformers(name):
    model = minialign.load_model(GOLDEN / name)
    ref = load_file(str(GOLDEN / name / "expected.safetensors"))
    prompt = ref["greedy.prompt_ids"][0].tolist()
    out, _ = generate_tokens(model, [prompt], eos_token_ids=[], pad_token_id=0, max_new_tokens=8)
    assert prompt + out[0] == ref["greedy.output_ids"][0].tolist()


def slow_llama3_frequencies(head_dim, theta, factor, low, high, original):
    """Meta's `apply_scaling` (meta-llama/llama-models, Llama 3.1 reference model), one frequency at a time."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(freq)
        elif wavelen > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def test_llama3_frequencies_equal_the_reference_loop_on_llama_3_2():
    """Llama 3.2 1B's 32 frequencies f_j = 500000^(-j/32), wavelength 2 pi 500000^(j/32): below
    8192 / 4 = 2048 for j <= 14 (500000^(14/32) = 311.4, times 2 pi = 1,956), unchanged; above 8192
    for j >= 18 (2 pi 500000^(18/32) = 10,089; j = 17: 6,695), divided by 32; j = 15, 16, 17 blended.
    The vectorised rule equals the loop to fp32 rounding."""
    cfg = ModelConfig.from_hf_dict(LLAMA_3_2_1B)
    assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    fast = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).double()
    slow = slow_llama3_frequencies(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)
    plain = rope_inverse_frequencies(64, 500000.0).double()
    ratio = plain / fast
    assert (ratio[:15] == 1).all() and torch.allclose(ratio[18:], torch.full((14,), 32.0, dtype=torch.float64))
    assert ((ratio[15:18] > 1) & (ratio[15:18] < 32)).all()


def test_linear_scaling_divides_every_frequency():
    scaled = rope_inverse_frequencies(16, 1e4, RopeScaling("linear", 4.0))
    torch.testing.assert_close(scaled * 4.0, rope_inverse_frequencies(16, 1e4))


def test_both_config_spellings_read_the_same_scaling():
    """transformers 4.x (rope_scaling + rope_theta, "type" or "rope_type") and 5.x (rope_parameters)."""
    scaling = LLAMA_3_2_1B["rope_scaling"]
    new = {k: v for k, v in LLAMA_3_2_1B.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    old_type = {**LLAMA_3_2_1B, "rope_scaling": {"type" if k == "rope_type" else k: v for k, v in scaling.items()}}
    configs = [ModelConfig.from_hf_dict(d) for d in (LLAMA_3_2_1B, new, old_type)]
    assert len({(c.rope_theta, c.rope_scaling) for c in configs}) == 1
    # A top-level original_max_position_embeddings wins, then max_position_embeddings (as transformers).
    no_original = {**scaling}
    del no_original["original_max_position_embeddings"]
    cfg = ModelConfig.from_hf_dict({**LLAMA_3_2_1B, "rope_scaling": no_original})
    assert cfg.rope_scaling.original_max_position_embeddings == 131072
    cfg = ModelConfig.from_hf_dict({**LLAMA_3_2_1B, "original_max_position_embeddings": 4096})
    assert cfg.rope_scaling.original_max_position_embeddings == 4096


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "yarn", "factor": 4.0}, r"'rope_scaling.rope_type' = 'yarn' is not implemented"),
    ({"type": "dynamic", "factor": 2.0}, r"'dynamic' is not implemented.*linear, llama3"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, r"needs a positive number 'high_freq_factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0},
     r"high_freq_factor 4.0 must be above low_freq_factor 4.0"),
    ({"rope_type": "linear"}, r"needs a positive number 'factor'"),
])
def test_other_rope_settings_are_refused_by_name(rope, message):
    with pytest.raises(minialign.errors.UserError, match=message):
        ModelConfig.from_hf_dict({**LLAMA_3_2_1B, "rope_scaling": rope}, source="config.json")
