"""Shared pytest fixtures, one per idea; each says what it builds and how long it takes."""
import json
import sys
from pathlib import Path

import pytest

from minialign.tokenizer import train_bpe_tokenizer

# The scripts (train_rm.py, train_dpo.py, evaluate.py) live at the repository root; tests import
# their parse_args and main directly, whatever directory pytest was started from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A few lines of chat-like English; enough for BPE to learn word pieces, small enough to train in
# well under a second. Bytes missing here (emoji, accents) still encode: the alphabet is all 256 bytes.
TINY_CORPUS = [
    "Hello! How are you today?",
    "I am fine, thank you. What is the capital of France?",
    "The capital of France is Paris. Paris is a large city.",
    "Can you help me write a short poem about the sea?",
    "Sure. The sea is blue and wide, the waves come in with the tide.",
    "What is two plus two? Two plus two is four.",
    "Please answer in one sentence.\nThank you for the help.",
    "user assistant system",
] * 20



def records(out, split="train") -> list[dict]:
    """A run folder's metrics.jsonl records of one split ("train" or "eval"), every line parsed:
    a line that is not JSON fails the test (the library's training_log.read_records would skip it)."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Folder of a byte-level BPE (vocab <= 512, plain ChatML template) trained on TINY_CORPUS.
    Special tokens: <|endoftext|> = 0 (pad), <|im_start|> = 1, <|im_end|> = 2 (eos)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(TINY_CORPUS, out, vocab_size=512)
    return out


def write_arithmetic_preferences(path, n=160, seed=0):
    """A learnable preference set in align-anything format: a correct, plain answer beats a
    wrong, hedged one ("I think it is 12, maybe."). The better side is random per record."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            good, bad = f"The answer is {a + b}.", f"I think it is {a + b + rng.randint(1, 9)}, maybe."
            better = rng.choice([1, 2])
            r1, r2 = (good, bad) if better == 1 else (bad, good)
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "response_1": r1, "response_2": r2,
                                "overall_response": better}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A learnable preference file, a BPE trained on it and a random tiny qwen2 model saved in
    HF layout with that tokenizer: {"data": path, "model": dir}. Builds in about a second."""
    import json

    import torch

    import minialign
    from minialign.config import ModelConfig
    from minialign.model import CausalLM

    root = tmp_path_factory.mktemp("tiny_world")
    data = write_arithmetic_preferences(root / "prefs.jsonl")
    texts = [" ".join(str(v) for v in json.loads(line).values()) for line in open(data)]
    tok = train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf_dict(dict(
        model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    minialign.save_model(CausalLM(cfg), root / "base", tok)
    return {"data": data, "model": root / "base", "root": root}


@pytest.fixture(scope="session")
def fast_demo_root(tmp_path_factory):
    """A folder holding the demo world as `python -m minialign.demo --fast` builds it (data,
    tokenizer, a base model from a 400-step supervised pass): about a minute on 2 cores,
    shared by the end-to-end demo test and the notebook test."""
    from minialign.demo_build import FAST_BASE, demo_paths

    root = tmp_path_factory.mktemp("demo_fast")
    demo_paths(root=root, base=FAST_BASE, log=lambda *a: None)
    return root
