"""On a CUDA GPU (skipped without one; bench/gpu_check.py runs them): the golden logits and reward
scores of tests/fixtures/golden in fp32 and under bf16 autocast, and the optimizer state of a
resumed run where the fused CUDA kernel needs it."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minialign
from minialign.resume import load_optimizer_tensors, optimizer_tensors

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GOLDEN = Path(__file__).parent / "fixtures" / "golden"
NAMES = ["qwen2_tied", "qwen2_untied", "qwen3", "llama", "llama_bias", "llama_rope_linear", "llama_rope_llama3",
         "qwen2_reward"]
FP32_ATOL = 1e-4  # as on the CPU (test_golden.py); PyTorch keeps TF32 off for fp32 matmuls by default
# bf16 keeps 8 significant bits: on these fixtures (logits up to 4.9) the CPU's bf16 autocast misses
# the fp32 numbers by at most 0.092; a wrong kernel or cast misses by whole units.
BF16_ATOL = 0.25


def max_golden_diff(name: str, dtype: str, device="cuda") -> float:
    """Largest |minialign - transformers| over the real positions of every recorded case."""
    model = minialign.load_model(GOLDEN / name, device=device).eval()
    ref = load_file(str(GOLDEN / name / "expected.safetensors"))
    worst = 0.0
    for case in sorted({k.split(".")[0] for k in ref if k.endswith(".input_ids") and not k.startswith("greedy")}):
        ids, mask = ref[f"{case}.input_ids"].to(device), ref[f"{case}.attention_mask"].to(device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(ids, mask).float().cpu()
        expected = ref.get(f"{case}.logits", ref.get(f"{case}.scores"))
        real = mask.bool().cpu() if out.dim() == 3 else slice(None)
        worst = max(worst, (out[real] - expected[real]).abs().max().item())
    return worst


@pytest.mark.parametrize("name", NAMES)
def test_golden_logits_on_cuda_fp32(name):
    assert max_golden_diff(name, "fp32") <= FP32_ATOL


@pytest.mark.parametrize("name", NAMES)
def test_golden_logits_on_cuda_bf16(name):
    assert max_golden_diff(name, "bf16") <= BF16_ATOL


def test_resumed_fused_adamw_steps_on_cuda():
    """Saved after two steps, loaded into a fresh fused AdamW: every state tensor (step included) on
    the GPU, and the next step runs (before: 'found at least two devices, cuda:0 and cpu')."""
    torch.manual_seed(0)
    model = minialign.load_model(GOLDEN / "qwen2_tied", device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 6), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for _ in range(2):
        model(ids).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    load_optimizer_tensors(model, fresh, optimizer_tensors(model, opt), "test")
    assert all(v.device.type == "cuda" for p in model.parameters() for v in fresh.state[p].values())
    model(ids).float().pow(2).mean().backward()
    fresh.step()
