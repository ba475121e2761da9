"""Chat templates minialign does not write in Python, rendered by Jinja: strings against what
transformers 5.24 rendered (tests/fixtures/chat_templates_jinja.json, made by
make_chat_templates.py), the end of turn each template writes, labels and reward sequences that
end there, the Jinja environment's helpers, the error without jinja2, and train_rm.py,
train_dpo.py and evaluate.py rm end to end on a tiny checkpoint carrying each template."""
import datetime
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

import minialign
import minialign.chat_jinja as chat_jinja
from conftest import TINY_CORPUS, write_arithmetic_preferences
from minialign.chat_jinja import ChatTemplateError, JinjaChatTemplate
from minialign.collate import PairSkipped, tokenize_pairs
from minialign.config import ModelConfig
from minialign.data import PreferencePair
from minialign.errors import UserError
from minialign.packing import IGNORE_INDEX, collate_pairs
from minialign.model import CausalLM
from minialign.reward import conversation_ids
from minialign.tokenizer import CHAT_FORMATS, CHATML_TEMPLATE, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = json.loads((FIXTURES / "chat_templates_jinja.json").read_text(encoding="utf-8"))
OFFICIAL = json.loads((FIXTURES / "chat_templates.json").read_text(encoding="utf-8"))
REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["zephyr", "llama3.2", "deepseek_r1_distill_qwen", "chatml_m"]
# What each template writes after an assistant's text (read off the golden strings by eye:
# "...Fine, thanks.</s>\n", "...<|eot_id|>", "...<｜end▁of▁sentence｜>", "...<|im_end|>\n").
END_OF_TURN = {"zephyr": "</s>", "llama3.2": "<|eot_id|>", "deepseek_r1_distill_qwen": "<｜end▁of▁sentence｜>",
               "chatml_m": "<|im_end|>"}
# Tokens that are single added tokens in each model's real vocabulary (Zephyr's <|user|> is plain text).
ADDED_TOKENS = {
    "zephyr": ["<unk>", "<s>", "</s>"],
    "llama3.2": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "deepseek_r1_distill_qwen": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                 "<think>", "</think>"],
    "chatml_m": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
# How Llama 3 and Qwen2 cut text into words before BPE (their tokenizer.json): a run of newlines
# is one word ("\n\n" before "The" as at the end of a prompt), unlike GPT-2's pattern.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PARAGRAPHS = ["One paragraph\n\nAnother paragraph\n\n"] * 20  # "\n\n" becomes one token, as in real BPEs
# `pip install -e ".[test]"` installs jinja2; without it these tests skip, except the one that checks the error.
needs_jinja2 = pytest.mark.skipif(importlib.util.find_spec("jinja2") is None, reason="jinja2 not installed")
FROZEN_NOW = datetime.datetime.fromisoformat(GOLDEN["now"])  # the clock the fixture was rendered with


def tokenize_one(tok, pair, **options):
    """One pair through tokenize_pairs, raising PairSkipped instead of dropping it."""
    return tokenize_pairs(tok, [pair], strict=True, **options)[0][0]


class FrozenDatetime(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return FROZEN_NOW


@pytest.fixture
def frozen_clock(monkeypatch):
    """strftime_now reads minialign.chat_jinja.datetime: freeze it as the fixture script froze transformers'."""
    monkeypatch.setattr(chat_jinja, "datetime", FrozenDatetime)


def write_template_tokenizer(folder: Path, name: str, vocab_size: int = 400) -> Path:
    """A byte-level BPE trained on TINY_CORPUS, the template's golden strings and PARAGRAPHS (so
    it learns template pieces and "\n\n", as real tokenizers do), with the model's added tokens, and
    a tokenizer_config.json holding its special tokens and its official chat template."""
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # as Llama 3's and Qwen2's tokenizer.json
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS[name]])
    rendered = [c["expected"] for c in GOLDEN["cases"] if c["template"] == name]
    backend.train_from_iterator(TINY_CORPUS + rendered + PARAGRAPHS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {**GOLDEN["special_tokens"][name],
              "chat_template": (FIXTURES / "templates" / f"{name}.jinja").read_text(encoding="utf-8")}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {name: write_template_tokenizer(root / name, name) for name in TEMPLATES}


@pytest.fixture(scope="module")
def tokenizers(template_dirs):
    return {name: load_tokenizer(d) for name, d in template_dirs.items()}


# ------------------------------------------------------------------ strings against transformers

@needs_jinja2
@pytest.mark.parametrize("case", GOLDEN["cases"],
                         ids=lambda c: f"{c['template']}-{c['name']}-gen{int(c['add_generation_prompt'])}")
def test_jinja_rendering_matches_transformers(case, tokenizers, frozen_clock):
    """64 strings: 4 templates x 8 conversations (system / none, multi-turn, unicode, empty
    system, reasoning in earlier turns) x generation prompt off and on."""
    tok = tokenizers[case["template"]]
    assert tok.chat_format == "jinja"
    assert tok.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["expected"]


@needs_jinja2
@pytest.mark.parametrize("case", OFFICIAL,
                         ids=lambda c: f"{c['template']}-{c['name']}-gen{int(c['add_generation_prompt'])}")
def test_jinja_renders_the_official_qwen_and_smollm2_templates_as_transformers(case):
    """--chat_format jinja on the families minialign also writes in Python gives the same strings
    (Qwen3 with enable_thinking=False, the one variable the fixture passed)."""
    template = (FIXTURES / "templates" / f"{case['template']}.jinja").read_text(encoding="utf-8")
    render = JinjaChatTemplate(template, {}, source=case["template"])
    extra = {"enable_thinking": False} if case["template"] == "qwen3" else {}
    assert render(case["messages"], case["add_generation_prompt"], **extra) == case["expected"]


@needs_jinja2
def test_only_the_exact_chatml_template_is_recognised(tiny_tokenizer_dir, template_dirs):
    """A ChatML template spelled differently goes to Jinja (and writes the same strings);
    the standard spelling stays with the Python renderer, unless --chat_format jinja."""
    chatml_m = load_tokenizer(template_dirs["chatml_m"])
    assert chatml_m.chat_format == "jinja" and load_tokenizer(tiny_tokenizer_dir).chat_format == "chatml"
    assert load_tokenizer(template_dirs["chatml_m"], chat_format="chatml").chat_format == "chatml"
    forced = load_tokenizer(tiny_tokenizer_dir, chat_format="jinja")
    for case in GOLDEN["cases"]:
        if case["template"] == "chatml_m":
            args = case["messages"], case["add_generation_prompt"]
            assert CHAT_FORMATS["chatml"](*args) == case["expected"] == forced.apply_chat_template(*args)


# ------------------------------------------------------------------ the end of turn, labels, rewards

@needs_jinja2
@pytest.mark.parametrize("name", TEMPLATES)
def test_end_of_turn_is_read_off_the_template(name, tokenizers):
    """The probe finds each template's own end of turn, one added token; generation stops on it first."""
    tok = tokenizers[name]
    eot_id = tok.token_to_id(END_OF_TURN[name])
    assert tok.end_of_turn_text == END_OF_TURN[name]
    assert tok.end_of_turn_ids == [eot_id] and tok.end_of_turn_token_id == eot_id
    assert tok.eos_token_ids[0] == eot_id


PROMPT = [{"role": "system", "content": "Please answer in one sentence."},
          {"role": "user", "content": "What is the capital of France?"}]


@needs_jinja2
@pytest.mark.parametrize("name", TEMPLATES)
def test_answers_are_labelled_through_their_own_end_of_turn(name, tokenizers, frozen_clock):
    """Each answer's tokens are its text then the end-of-turn token, labelled; whatever the
    template writes after (Zephyr's and ChatML's "\\n") is cut, so the last real token, where a
    reward model reads, is the end of turn. DeepSeek-R1's prompt ends "<think>\\n", which its
    rendered answer lacks: that pair is built after the generation prompt, and counted."""
    tok = tokenizers[name]
    pair = PreferencePair(prompt=PROMPT, chosen="The capital of France is Paris.", rejected="I am fine", line=3)
    tp = tokenize_one(tok, pair)
    eot = tok.token_to_id(END_OF_TURN[name])
    assert tp.chosen_ids == tok.encode(pair.chosen) + [eot]
    assert tp.rejected_ids == tok.encode(pair.rejected) + [eot]
    assert tok.decode(tp.prompt_ids) == tok.apply_chat_template(PROMPT, add_generation_prompt=True)
    batch = collate_pairs([tp], tok.pad_token_id)
    for row, answer in enumerate((tp.chosen_ids, tp.rejected_ids)):
        n = int(batch.lengths[row])
        assert batch.input_ids[row, n - 1] == eot and batch.labels[row, n - 1] == eot
        assert (batch.labels[row, :len(tp.prompt_ids)] == IGNORE_INDEX).all()
        assert batch.labels[row, len(tp.prompt_ids):n].tolist() == answer
    # The reward model scores generated answers on exactly the sequence it was trained on.
    assert conversation_ids(tok, PROMPT, pair.chosen) == tp.prompt_ids + tp.chosen_ids
    _, stats = tokenize_pairs(tok, [pair])
    built = name == "deepseek_r1_distill_qwen"
    assert stats.from_generation_prompt == int(built)
    assert ("built as generation prompt + answer + end of turn, since the chat template of" in stats.summary()) == built


@needs_jinja2
def test_deepseek_reasoning_in_earlier_turns_keeps_the_prompt_a_prefix(tokenizers):
    """DeepSeek-R1 drops the reasoning of earlier assistant turns in both renderings, so only the
    final turn differs; the answer's own "</think>" text is kept verbatim after the prompt."""
    tok = tokenizers["deepseek_r1_distill_qwen"]
    prompt = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>r</think>A1"},
              {"role": "user", "content": "Q2"}]
    tp = tokenize_one(tok, PreferencePair(prompt, "step</think>Paris.", "No.", line=1))
    assert tok.decode(tp.prompt_ids).endswith("<｜User｜>Q1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>Q2"
                                              "<｜Assistant｜><think>\n")
    assert tok.decode(tp.chosen_ids) == "step</think>Paris.<｜end▁of▁sentence｜>"


@needs_jinja2
def test_not_prefix_skip_names_the_template(tokenizers):
    """An answer opening with "\\n" merges with ChatML's "assistant\\n" under byte-level BPE."""
    tok = tokenizers["chatml_m"]
    with pytest.raises(PairSkipped, match=r"not_prefix: with the chat template of .*tokenizer_config.json "
                                          r"\(rendered by Jinja\), the prompt's tokens"):
        tokenize_one(tok, PreferencePair([{"role": "user", "content": "Hi"}], "\n\nParis", "No.", line=5))


# ------------------------------------------------------------------ the Jinja environment

@needs_jinja2
def test_jinja_helpers_behave_as_transformers_defines_them():
    """Written out by hand: tojson does not escape HTML and keeps non-ASCII (json.dumps with
    ensure_ascii=False); {% generation %} renders its body; {% break %} works; raise_exception
    and the immutable sandbox become one-line errors naming the template's file."""
    msgs = [{"role": "user", "content": "<b>café</b> & 'x'"}, {"role": "assistant", "content": "A"}]
    render = JinjaChatTemplate("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1) | length }}", {}, "t")
    assert render(msgs) == '{"role": "user", "content": "<b>café</b> & \'x\'"}|' + str(len(json.dumps(
        msgs[0], ensure_ascii=False, indent=1)))
    render = JinjaChatTemplate("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                               "[{% generation %}{{ m.content }}{% endgeneration %}]{% endfor %}{{ eos_token }}",
                               {"eos_token": "</s>", "bos_token": None}, "t")
    assert render(msgs) == "[<b>café</b> & 'x']</s>"
    refuse = JinjaChatTemplate("{{ raise_exception('Only user and assistant roles are supported!') }}", {}, "cfg.json")
    with pytest.raises(ChatTemplateError, match=r"^cfg.json: the chat template refused the conversation: Only user"):
        refuse(msgs)
    with pytest.raises(ChatTemplateError, match="cfg.json"):
        JinjaChatTemplate("{{ messages.append(1) }}", {}, "cfg.json")(msgs)
    with pytest.raises(ChatTemplateError, match="may not store '_x'"):
        JinjaChatTemplate("{% set ns = namespace(_x=1) %}", {}, "cfg.json")(msgs)
    with pytest.raises(UserError, match=r"cfg.json: the chat template is not valid Jinja \(template line 1"):
        JinjaChatTemplate("{% for m in messages %}", {}, "cfg.json")


@needs_jinja2
def test_template_refusing_a_pair_names_its_line(tmp_path, tiny_tokenizer_dir):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tiny_tokenizer_dir / "tokenizer.json").read_bytes())
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}" + CHATML_TEMPLATE[len("{% for message in messages %}"):].replace("message", "m"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    tok = load_tokenizer(folder)
    assert tok.chat_format == "jinja"
    with pytest.raises(UserError, match=r"^line 9: .*tokenizer_config.json: the chat template refused the "
                                        r"conversation: System role not supported$"):
        tokenize_pairs(tok, [PreferencePair(PROMPT, "Paris.", "No.", line=9)])


def test_without_jinja2_an_unknown_template_is_one_line_naming_the_extra_and_the_flag(
        monkeypatch, template_dirs, tiny_tokenizer_dir):
    """jinja2 is optional: a None in sys.modules makes `import jinja2` fail as if it were not installed."""
    for module in ("jinja2", "jinja2.ext", "jinja2.sandbox"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UserError) as e:
        load_tokenizer(template_dirs["zephyr"])
    message = str(e.value)
    assert "\n" not in message and "tokenizer_config.json" in message
    assert 'pip install -e ".[templates]"' in message and "--chat_format" in message
    assert load_tokenizer(tiny_tokenizer_dir).chat_format == "chatml"  # known families need no jinja2
    assert load_tokenizer(template_dirs["chatml_m"], chat_format="chatml").end_of_turn_text == "<|im_end|>"


# ------------------------------------------------------------------ end to end: train and evaluate

MODELS = {  # the architecture each template comes with; llama3.2 with its RoPE scaling
    "zephyr": dict(model_type="llama", tie_word_embeddings=True),
    "llama3.2": dict(model_type="llama", tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "deepseek_r1_distill_qwen": dict(model_type="qwen2", tie_word_embeddings=False),
    "chatml_m": dict(model_type="qwen2", tie_word_embeddings=True),
}


def run_script(script: str, argv: list[str]):
    """A script's main(argv) in this process (no new interpreter and torch import per run)."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def checkpoints(template_dirs, tmp_path_factory):
    """A random tiny causal LM per template, saved with its template's tokenizer."""
    root = tmp_path_factory.mktemp("template_models")
    out = {}
    for name, d in template_dirs.items():
        tok = load_tokenizer(d)
        torch.manual_seed(0)
        cfg = ModelConfig.from_hf_dict(dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            **MODELS[name]))
        minialign.save_model(CausalLM(cfg), root / name, d)
        out[name] = root / name
    out["data"] = write_arithmetic_preferences(root / "prefs.jsonl", n=48)
    return out


SMALL = ["--max_steps", "3", "--batch_size", "4", "--max_length", "96", "--max_prompt_length", "64",
         "--eval_split", "0.25", "--log_every", "1"]


@needs_jinja2
@pytest.mark.slow
@pytest.mark.parametrize("name", TEMPLATES)
def test_train_and_evaluate_with_each_template(name, checkpoints, tmp_path, capsys, monkeypatch):
    """train_rm.py, train_dpo.py (3 steps each) and evaluate.py rm on a checkpoint carrying the
    template. Checks: both runs finish with finite losses, DPO starts at ln 2, the saved models
    keep the template, and the load report says which pairs were built after the generation prompt
    (all of them for DeepSeek-R1, none otherwise). The Llama 3.2 DPO run names its model by a Hub
    id, found in a Hugging Face cache laid out as huggingface_hub writes it (see test_hub.py)."""
    model, data = checkpoints[name], checkpoints["data"]
    rm = run_script("train_rm.py", ["--model", model, "--data", data, "--output", tmp_path / "rm", *SMALL,
                                    "--lr", "1e-3"])
    report = capsys.readouterr().out
    if name == "llama3.2":
        snapshot = tmp_path / "hub" / "models--tiny-org--llama-tiny" / "snapshots" / "0123abcd"
        shutil.copytree(model, snapshot)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        model = "tiny-org/llama-tiny"
    dpo = run_script("train_dpo.py", ["--model", model, "--data", data, "--output", tmp_path / "dpo", *SMALL])
    summary = run_script("evaluate.py", ["rm", "--reward_model", tmp_path / "rm" / "model", "--data", data,
                                         "--output", tmp_path / "eval", "--num_pairs", "8"])
    assert all(math.isfinite(v) for v in (rm["loss"], dpo["loss"], summary["accuracy"]))
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.6931) < 1e-3, first  # policy == reference at step 1
    for run in ("rm", "dpo"):
        assert load_tokenizer(tmp_path / run / "model").end_of_turn_text == END_OF_TURN[name]
    built = "built as generation prompt + answer + end of turn" in report
    assert built == (name == "deepseek_r1_distill_qwen"), report
