"""Tokenizer: chat formats against strings rendered by the official Jinja templates (committed
fixtures), the real Qwen3 tokenizer against its own config, and a tiny trained BPE round trip."""
import json
import os
import shutil
from pathlib import Path

import pytest

from minialign.tokenizer import (
    CHAT_FORMATS, SHORT_TEMPLATES, Tokenizer, detect_chat_format, load_tokenizer, train_bpe_tokenizer,
)

FIXTURES = Path(__file__).parent / "fixtures"
CHAT_FIXTURE = FIXTURES / "chat_templates.json"
SHARED = Path(os.environ.get("MINIALIGN_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
QWEN3_DIR = SHARED / "data" / "qwen3-tokenizer"

needs_chat_fixture = pytest.mark.skipif(not CHAT_FIXTURE.is_file(), reason=f"{CHAT_FIXTURE} not generated yet")
needs_qwen3 = pytest.mark.skipif(not QWEN3_DIR.is_dir(), reason=f"shared Qwen3 tokenizer absent ({QWEN3_DIR})")


# ------------------------------------------------------------------ chat formats vs official templates

def _chat_records():
    return json.loads(CHAT_FIXTURE.read_text()) if CHAT_FIXTURE.is_file() else []


@needs_chat_fixture
@pytest.mark.parametrize("record", _chat_records(), ids=lambda r: f"{r['template']}-{r.get('name', '')}-gen{int(r['add_generation_prompt'])}")
def test_chat_format_matches_official_template(record):
    """Our plain-Python rendering equals what transformers + jinja2 rendered from the official template."""
    render = CHAT_FORMATS[record["template"]]
    assert render(record["messages"], record["add_generation_prompt"]) == record["expected"]


@needs_chat_fixture
def test_fixture_covers_every_model_format():
    assert {r["template"] for r in _chat_records()} == {"qwen2.5", "qwen2", "qwen3", "smollm2"}


@pytest.mark.parametrize("name", ["qwen2.5", "qwen2", "qwen3", "smollm2"])
def test_official_templates_are_detected(name):
    path = FIXTURES / "templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{path} not generated yet")
    assert detect_chat_format(path.read_text()) == name


@pytest.mark.parametrize("name", ["qwen2", "smollm2"])
def test_short_templates_are_the_official_ones(name):
    """The templates train_bpe_tokenizer writes are the official text (up to newline spelling)."""
    path = FIXTURES / "templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{path} not generated yet")
    squash = lambda t: "".join(t.replace("\\n", "\n").split())
    assert squash(SHORT_TEMPLATES[name]) == squash(path.read_text())


def test_chat_formats_by_hand():
    """Spelled out from the template rules: default system turns, and Qwen3's empty think block."""
    msgs = [{"role": "user", "content": "Hi"}]
    assert CHAT_FORMATS["chatml"](msgs, True) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert CHAT_FORMATS["qwen2"](msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert CHAT_FORMATS["qwen2.5"]([{"role": "system", "content": "S"}] + msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert CHAT_FORMATS["qwen3"](msgs, True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # An assistant turn before the last user message loses its reasoning; the final one gets a block.
    convo = msgs + [{"role": "assistant", "content": "<think>r</think>\n\nA"}, {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "B"}]
    assert CHAT_FORMATS["qwen3"](convo) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nB<|im_end|>\n")


def test_prompt_is_prefix_of_conversation_in_every_format():
    """Invariant the collator relies on: rendering with the generation prompt is a string prefix
    of rendering the same conversation with the assistant's answer appended."""
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    for name, render in CHAT_FORMATS.items():
        full = render(prompt + [{"role": "assistant", "content": "answer"}])
        assert full.startswith(render(prompt, add_generation_prompt=True)), name
        assert full.endswith("answer<|im_end|>\n"), name


def test_bad_messages_and_unknown_template_are_clear_errors():
    with pytest.raises(ValueError, match=r"messages\[1\].*role"):
        CHAT_FORMATS["chatml"]([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[0\].*content"):
        CHAT_FORMATS["qwen3"]([{"role": "user", "content": None}])
    # Not a family minialign writes in Python: no guess, the template goes to Jinja (test_chat_templates.py).
    assert detect_chat_format("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}") is None


# ------------------------------------------------------------------ the real Qwen3 tokenizer

@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer(QWEN3_DIR)


@needs_qwen3
def test_qwen3_special_tokens_match_its_config(qwen3):
    """Every token listed in tokenizer_config.json's added_tokens_decoder encodes, written literally,
    to exactly its own id (e.g. "<|im_start|>" -> 151644)."""
    decoder = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert qwen3.encode("<|im_start|>") == [151644]
    for token_id, entry in decoder.items():
        assert qwen3.encode(entry["content"]) == [int(token_id)], entry["content"]


@needs_qwen3
def test_qwen3_ids(qwen3):
    """Published Qwen3 values: <|im_end|> 151645 and <|endoftext|> 151643 end generation, pad is
    <|endoftext|>, no bos, 151,643 BPE tokens + 26 added = 151,669."""
    assert qwen3.chat_format == "qwen3"
    assert qwen3.eos_token_ids == [151645, 151643]
    assert qwen3.end_of_turn_token_id == 151645
    assert qwen3.pad_token_id == 151643 and qwen3.bos_token_id is None
    assert len(qwen3) == qwen3.vocab_size == 151669


@needs_qwen3
def test_qwen3_decode_round_trip(qwen3):
    text = qwen3.apply_chat_template([{"role": "user", "content": "Grüße, 東京! 🙂\n  indented\tcode"}], True)
    ids = qwen3.encode(text)
    assert qwen3.decode(ids) == text
    assert ids[0] == 151644 and qwen3.decode(ids, skip_special_tokens=True).startswith("user\nGrüße")


# ------------------------------------------------------------------ loading: config variants and errors

def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_config_variants(tiny_tokenizer_dir, tmp_path):
    """AddedToken dicts, a list of named templates, chat_template.jinja, and generation_config.json."""
    d = _copy(tiny_tokenizer_dir, tmp_path / "a", eos_token={"content": "<|im_end|>", "special": True},
              chat_template=[{"name": "tool_use", "template": "x"},
                             {"name": "default", "template": SHORT_TEMPLATES["smollm2"]}])
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(d)
    assert tok.chat_format == "smollm2" and tok.eos_token_ids == [2, 0, 7]
    (d / "chat_template.jinja").write_text(SHORT_TEMPLATES["qwen2"])  # the file wins over the config
    assert load_tokenizer(d).chat_format == "qwen2"


def test_load_errors_name_file_and_key(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tiny_tokenizer_dir / "tokenizer.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing tokenizer_config.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="'eos_token'"):
        load_tokenizer(_copy(tiny_tokenizer_dir, tmp_path / "a", eos_token=None))
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in"):
        load_tokenizer(_copy(tiny_tokenizer_dir, tmp_path / "b", pad_token="<pad>"))
    # A template that never writes an answer's text leaves no end of turn to find.
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*does not write an assistant.*--chat_format"):
        load_tokenizer(_copy(tiny_tokenizer_dir, tmp_path / "c", chat_template="{% for m in messages %}{{ m.role }}{% endfor %}"))
    with pytest.raises(ValueError, match="chat_format='llama3' is not one of"):
        load_tokenizer(tiny_tokenizer_dir, chat_format="llama3")


def test_explicit_chat_format_and_missing_template(tiny_tokenizer_dir, tmp_path):
    d = _copy(tiny_tokenizer_dir, tmp_path / "a", chat_template="{{ messages }}")
    assert load_tokenizer(d, chat_format="qwen2").apply_chat_template([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.")
    bare = load_tokenizer(_copy(tiny_tokenizer_dir, tmp_path / "b", chat_template=None))
    assert bare.chat_format is None and bare.eos_token_ids == [2]  # only the configured eos
    assert bare.encode("Hello") == load_tokenizer(tiny_tokenizer_dir).encode("Hello")
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_pad_falls_back_to_endoftext(tiny_tokenizer_dir, tmp_path):
    assert load_tokenizer(_copy(tiny_tokenizer_dir, tmp_path / "a", pad_token=None)).pad_token_id == 0


# ------------------------------------------------------------------ train_bpe_tokenizer

def test_train_bpe_tokenizer_round_trip(tiny_tokenizer_dir, tmp_path):
    tok = load_tokenizer(tiny_tokenizer_dir)
    assert isinstance(tok, Tokenizer) and tok.chat_format == "chatml"
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.eos_token_ids == [2, 0] and tok.pad_token_id == 0 and tok.bos_token_id is None
    assert 259 <= len(tok) <= 512
    # Bytes never seen in training still round-trip: the alphabet holds all 256 bytes.
    text = tok.apply_chat_template([{"role": "user", "content": "Hello! Ça va? 🙂"}], add_generation_prompt=True)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[0] == 1 and ids.count(2) == 1
    assert tok.encode_batch([text, "Paris"]) == [ids, tok.encode("Paris")]
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(text) == ids and again.chat_format == "chatml" and again.eos_token_ids == tok.eos_token_ids


def test_train_bpe_tokenizer_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["abc"], tmp_path, vocab_size=100)
    with pytest.raises(ValueError, match="qwen3"):
        train_bpe_tokenizer(["abc"], tmp_path, chat_format="qwen3")
    assert train_bpe_tokenizer(["abc"], tmp_path / "s", vocab_size=300, chat_format="smollm2").chat_format == "smollm2"
