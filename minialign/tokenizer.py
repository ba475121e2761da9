"""Tokenizer: Hugging Face `tokenizers` for text <-> ids, chat templates as plain Python.

A Hugging Face tokenizer folder holds two things we need:
  tokenizer.json         the byte-level BPE itself (vocabulary, merges, special tokens),
                         loaded with the Rust `tokenizers` library;
  tokenizer_config.json  which tokens are eos / pad / bos, and a *chat template*: a Jinja
                         program that turns a list of messages into one prompt string.

We do not execute Jinja. Every model family we support writes its conversations in
ChatML, each turn being

    <|im_start|>{role}\n{content}<|im_end|>\n

and differs only in small ways (a default system prompt, Qwen3's empty <think> block).
Each family is one short function below that reproduces the official template for
plain system/user/assistant conversations (no tools, no images); tests compare them with
strings rendered by the official Jinja templates. The family is recognised from a
distinctive substring of the template (see `detect_chat_format`) or named explicitly
with `load_tokenizer(path, chat_format=...)`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from .errors import MissingFileError, UserError, read_json

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")

QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_SYSTEM = "You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Qwen3 with enable_thinking=False: the assistant turn opens with an empty reasoning block.
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"

# Official templates short enough to carry verbatim. `train_bpe_tokenizer` writes them into
# the tokenizer_config.json it creates, so that the tiny tokenizers look like real ones.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _with_default_system(system: str) -> str:
    """The Qwen2 / SmolLM2 template: ChatML plus a system turn when the first message is not one."""
    return (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}{% endif %}"
        + CHATML_TEMPLATE[len("{% for message in messages %}"):]
    )


SHORT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "qwen2": _with_default_system(QWEN2_SYSTEM),
    "smollm2": _with_default_system(SMOLLM2_SYSTEM),
}


# ----------------------------------------------------------------------------------------
# Chat formats: messages -> prompt string


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: 'content' must be a string, got {type(m.get('content')).__name__}")


def _turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _chatml(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> str:
    """ChatML; `default_system` is prepended when the first message is not a system turn.

    Qwen2 and SmolLM2 check `loop.first`, so an empty conversation gets no system turn.
    """
    _check_messages(messages)
    text = ""
    if default_system is not None and messages and messages[0]["role"] != "system":
        text += _turn("system", default_system)
    text += "".join(_turn(m["role"], m["content"]) for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Plain ChatML without a default system prompt (our own tiny tokenizers)."""
    return _chatml(messages, add_generation_prompt, default_system=None)


def render_qwen2(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _chatml(messages, add_generation_prompt, default_system=QWEN2_SYSTEM)


def render_smollm2(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _chatml(messages, add_generation_prompt, default_system=SMOLLM2_SYSTEM)


def render_qwen2_5(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Qwen2.5: its template tests `messages[0]` outside the loop, so even an empty
    conversation gets the default system turn."""
    _check_messages(messages)
    if messages and messages[0]["role"] == "system":
        return _chatml(messages, add_generation_prompt, default_system=None)
    return _turn("system", QWEN2_5_SYSTEM) + _chatml(messages, add_generation_prompt, default_system=None)


def _qwen3_last_query_index(messages: list[dict]) -> int:
    """Index of the last real user message (tool results wrapped in <tool_response> do not
    count); the official template defaults to the last index when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def render_qwen3(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Qwen3's official template with enable_thinking=False, for conversations without tools.

    Rules copied from the template:
      * no default system prompt;
      * an assistant turn holding "</think>" is split: reasoning is the text before the first
        "</think>" (after any "<think>"), the answer the text after the last one, newlines trimmed;
      * assistant turns *before* the last user message keep only the answer;
      * assistant turns *after* it get a "<think>\\n{reasoning}\\n</think>\\n\\n" block when they
        are the final message or have non-empty reasoning; with no reasoning that is the
        empty block "<think>\\n\\n</think>\\n\\n", the same text the generation prompt ends with,
        so a rendered prompt stays a prefix of the rendered prompt + answer.
    """
    _check_messages(messages)
    last_query = _qwen3_last_query_index(messages)
    parts = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "assistant":  # system and user turns are plain ChatML, wherever they are
            parts.append(_turn(role, content))
            continue
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        is_last = i == len(messages) - 1
        if i > last_query and (is_last or reasoning):
            reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
            parts.append(f"{IM_START}assistant\n<think>\n{reasoning}\n</think>\n\n{content}")
        else:
            parts.append(f"{IM_START}assistant\n{content}")
        parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n{QWEN3_EMPTY_THINK}")
    return "".join(parts)


CHAT_FORMATS = {
    "qwen2.5": render_qwen2_5,
    "qwen2": render_qwen2,
    "qwen3": render_qwen3,
    "smollm2": render_smollm2,
    "chatml": render_chatml,
}


def _normalise(template: str) -> str:
    """Compare templates up to whitespace and the spelling of newlines ("\\n" escape or real)."""
    return "".join(template.replace("\\n", "\n").split())


def detect_chat_format(template: str, source: str = "chat_template") -> str:
    """Name the chat format of a Jinja template from distinctive text in it.

    Checked in this order (the first match wins):
      qwen3    contains "enable_thinking" and "last_query_index" (the hybrid-thinking Qwen3
               template; the 2507 Instruct/Thinking templates lack "enable_thinking")
      qwen2.5  contains Qwen2.5's default system prompt "You are Qwen, created by Alibaba Cloud."
      smollm2  contains "You are a helpful AI assistant named SmolLM"
      qwen2    contains "You are a helpful assistant.<|im_end|>" (Qwen2 / Qwen1.5 default system)
      chatml   equals the standard ChatML template (`CHATML_TEMPLATE`) up to whitespace; plain
               ChatML has nothing distinctive, so anything else is rejected rather than guessed.
    """
    t = template.replace("\\n", "\n")
    if IM_START in t and "enable_thinking" in t and "last_query_index" in t:
        return "qwen3"
    if IM_START in t and "You are Qwen, created by Alibaba Cloud." in t:
        return "qwen2.5"
    if IM_START in t and "You are a helpful AI assistant named SmolLM" in t:
        return "smollm2"
    if IM_START in t and f"{QWEN2_SYSTEM}{IM_END}" in t:
        return "qwen2"
    if _normalise(template) == _normalise(CHATML_TEMPLATE):
        return "chatml"
    raise UserError(
        f"unrecognised chat template in {source} (starts {template[:60]!r}); minialign renders only "
        f"{sorted(CHAT_FORMATS)} in plain Python. If this model uses one of them, choose it "
        f"explicitly with load_tokenizer(path, chat_format=...)"
    )


# ----------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Byte-level BPE (Rust `tokenizers`) + special-token ids + a chat format.

    pad_token_id: the configured pad token; without one, "<|endoftext|>" if the vocabulary has
        it, else the first eos id. Padding positions are masked, so any id works; these keep it
        a token the model knows.
    eos_token_ids: for ChatML chat formats "<|im_end|>" (ends a turn) and "<|endoftext|>" (ends a
        document; base-model habit) whichever exist, then the configured eos and any ids from
        generation_config.json. Without a chat format, the configured eos (+ generation_config).
    """

    def __init__(self, backend: RustTokenizer, eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None,
                 chat_format: str | None = None, extra_eos_token_ids: tuple[int, ...] = (),
                 config: dict | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        if chat_format is None and chat_template is not None:
            chat_format = detect_chat_format(chat_template, source)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise UserError(f"chat_format={chat_format!r} is not one of {sorted(CHAT_FORMATS)}")
        self.chat_format = chat_format
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.config = dict(config or {})  # other tokenizer_config.json keys, written back by save()

        eos_id = self._id_of(eos_token, "eos_token")
        self.bos_token_id = None if bos_token is None else self._id_of(bos_token, "bos_token")
        self.end_of_turn_token_id = backend.token_to_id(IM_END)
        if chat_format is not None and self.end_of_turn_token_id is None:
            raise UserError(f"{source}: chat format {chat_format!r} needs {IM_END!r} in the vocabulary")
        endoftext_id = backend.token_to_id(ENDOFTEXT)

        ids = [self.end_of_turn_token_id, endoftext_id] if chat_format is not None else []
        ids += [eos_id, *extra_eos_token_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in ids if i is not None))  # ordered, unique
        if pad_token is not None:
            self.pad_token_id = self._id_of(pad_token, "pad_token")
        else:
            self.pad_token_id = endoftext_id if endoftext_id is not None else self.eos_token_ids[0]

    def _id_of(self, token: str, key: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise UserError(f"{self.source}: {key} {token!r} is not in tokenizer.json's vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce, added tokens included (Qwen3: 151,669). The model's
        embedding may have more rows (Qwen3: 151,936), padded for efficient matmuls."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Text -> ids. Nothing is added (no bos); special tokens written in the text, such as
        "<|im_start|>", are matched before BPE and map to their own ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # int() so a list of tensor elements or numpy ints works too.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """messages [{"role", "content"}, ...] -> the prompt string the model was trained on.
        With add_generation_prompt, the string ends where the assistant's answer begins."""
        if self.chat_format is None:
            raise UserError(
                f"{self.source}: no chat template (neither 'chat_template' in tokenizer_config.json nor "
                f"chat_template.jinja); choose one with load_tokenizer(path, chat_format=...) "
                f"from {sorted(CHAT_FORMATS)}"
            )
        return CHAT_FORMATS[self.chat_format](messages, add_generation_prompt)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `path`.
        An explicit `chat_format=` override is not recorded; pass it again when loading."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        config.update(eos_token=self.eos_token, pad_token=self.pad_token, bos_token=self.bos_token)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(path / "tokenizer_config.json", "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------
# Loading and training


def _token_str(config: dict, key: str, source: str) -> str | None:
    """A special token entry is a string, an AddedToken dict {"content": ...}, or null."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{source}: key {key!r} must be a string or {{'content': str}}, got {value!r:.80}")


def _chat_template(folder: Path, config: dict, source: str) -> str | None:
    """chat_template.jinja wins over the config key (newer transformers saves it there); the key
    may be a string or a list of {"name", "template"} from which we take "default"."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{source}: 'chat_template' is a list without a 'default' entry (has {sorted(named)})")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(f"{source}: 'chat_template' must be a string or a list of {{name, template}}")
    return template


def load_tokenizer(path: str | os.PathLike, chat_format: str | None = None) -> Tokenizer:
    """Load a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json, optional
    chat_template.jinja and generation_config.json). `chat_format` overrides template detection."""
    folder = Path(path)
    tok_file, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    for f in (tok_file, cfg_file):
        if not f.is_file():
            raise MissingFileError(f"tokenizer folder {folder}: missing {f.name}")
    try:
        backend = RustTokenizer.from_file(str(tok_file))
    except Exception as e:  # the Rust library raises a plain Exception for any unreadable file
        raise UserError(f"{tok_file}: not a readable tokenizer file ({e})") from None
    config = read_json(cfg_file, "the tokenizer's settings")
    source = str(cfg_file)
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object of settings, got {type(config).__name__}")
    eos = _token_str(config, "eos_token", source)
    if eos is None:
        raise UserError(f"{source}: missing key 'eos_token'")

    extra_eos: list[int] = []
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        generation = read_json(gen_file, "the model's generation settings")
        gen_eos = generation.get("eos_token_id") if isinstance(generation, dict) else None
        extra_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])

    owned = ("eos_token", "pad_token", "bos_token", "chat_template")
    return Tokenizer(
        backend, eos_token=eos, pad_token=_token_str(config, "pad_token", source),
        bos_token=_token_str(config, "bos_token", source),
        chat_template=_chat_template(folder, config, source), chat_format=chat_format,
        extra_eos_token_ids=tuple(extra_eos), source=source,
        config={k: v for k, v in config.items() if k not in owned},
    )


MIN_BYTE_LEVEL_VOCAB = 256 + 3  # every byte must be a token, plus our three special tokens


def train_bpe_tokenizer(texts, out_dir: str | os.PathLike, vocab_size: int = 512,
                        chat_format: str = "chatml") -> Tokenizer:
    """Train a tiny byte-level BPE on `texts` and save it as a Hugging Face tokenizer folder.

    Special tokens get ids 0, 1, 2: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos). The
    chat template written is the official one for `chat_format` ("chatml", "qwen2" or "smollm2").
    """
    if vocab_size < MIN_BYTE_LEVEL_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} is below {MIN_BYTE_LEVEL_VOCAB} (256 bytes + 3 special tokens)")
    if chat_format not in SHORT_TEMPLATES:
        raise ValueError(f"train_bpe_tokenizer writes templates only for {sorted(SHORT_TEMPLATES)}, got {chat_format!r}")
    backend = RustTokenizer(models.BPE())
    # add_prefix_space=False as in Qwen: "Hi" and " Hi" stay different tokens, nothing is invented.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
    )
    backend.train_from_iterator(list(texts), trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "bos_token": None,
              "chat_template": SHORT_TEMPLATES[chat_format]}
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)
    return load_tokenizer(out)
