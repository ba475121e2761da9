"""Tokenizer: Hugging Face `tokenizers` for text <-> ids, and the checkpoint's chat template.

A Hugging Face tokenizer folder holds two things we need:
  tokenizer.json         the byte-level BPE itself (vocabulary, merges, special tokens),
                         loaded with the Rust `tokenizers` library;
  tokenizer_config.json  which tokens are eos / pad / bos, and a *chat template*: a Jinja
                         program that turns a list of messages into one prompt string.

Which renderer runs the chat template is `chat_format` (`--chat_format` in the scripts):
  auto (default)  a template minialign recognises (Qwen2.5, Qwen2, Qwen3, SmolLM2, plain ChatML;
                  see chat_formats.detect_chat_format) is rendered by its plain-Python function;
                  any other by Jinja, exactly as transformers renders it (chat_jinja.py, jinja2)
  a family name   that plain-Python renderer, whatever the template says
  jinja           the template itself through Jinja, even for a family minialign knows

The end of an assistant turn is read off the template, not assumed: rendering a probe
conversation [user, assistant], it is what the template writes right after the assistant's
text, surrounding whitespace trimmed: "<|im_end|>" for ChatML, "<|eot_id|>" for Llama 3, "</s>"
for Zephyr, "<｜end▁of▁sentence｜>" for DeepSeek-R1. Its tokens (`end_of_turn_ids`) are where
the labels of an answer end and where a reward model reads its score (collate.py, reward.py),
and, being one token in all of these, the first id a generation stops on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from .chat_formats import (  # noqa: F401  (re-exported: the chat formats are part of this module's API)
    CHAT_FORMATS, CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, SHORT_TEMPLATES, TRAINED_TEMPLATES, detect_chat_format,
)
from .chat_jinja import SPECIAL_TOKEN_KEYS, JinjaChatTemplate
from .errors import MissingFileError, UserError, read_json
from .hub import resolve_model_path

JINJA = "jinja"  # chat_format: run the template itself with Jinja
AUTO = "auto"    # chat_format: a recognised family in Python, anything else with Jinja
CHAT_FORMAT_CHOICES = (AUTO, *CHAT_FORMATS, JINJA)  # what --chat_format accepts
# The probe conversation that finds the end-of-turn text: plain words that no template rewrites
# (Llama 3 trims contents, DeepSeek-R1 cuts at "</think>", Qwen3 at "<think>").
PROBE_USER, PROBE_ANSWER = "Hello.", "Fine, thanks."


def choose_chat_format(template: str | None, chat_format: str | None, source: str) -> str | None:
    """The renderer for `template`: a CHAT_FORMATS name, "jinja", or None without any template."""
    if chat_format not in (None, *CHAT_FORMAT_CHOICES):
        raise UserError(f"chat_format={chat_format!r} is not one of {', '.join(CHAT_FORMAT_CHOICES)} (--chat_format)")
    if chat_format == JINJA and template is None:
        raise UserError(f"{source}: --chat_format jinja needs a chat template ('chat_template' in "
                        f"tokenizer_config.json or chat_template.jinja), and there is none")
    if chat_format in (None, AUTO):
        return None if template is None else (detect_chat_format(template) or JINJA)
    return chat_format


def find_end_of_turn(render, template_name: str) -> str:
    """What the template writes right after an assistant message's text, whitespace trimmed
    (e.g. "<|im_end|>\\n" -> "<|im_end|>"): the text that ends every answer minialign trains on."""
    convo = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]
    text = render(convo, add_generation_prompt=False)
    at = text.rfind(PROBE_ANSWER)
    if at < 0:
        raise UserError(f"{template_name} does not write an assistant message's text as it is (rendering "
                        f"{PROBE_ANSWER!r} gave {text[-80:]!r}), so minialign cannot tell where an answer ends; "
                        f"choose another renderer with --chat_format")
    end = text[at + len(PROBE_ANSWER):].strip()
    if not end:
        raise UserError(f"{template_name} writes nothing after an assistant message, so an answer has no "
                        f"end-of-turn token to learn (nor a place to read a reward); choose another renderer "
                        f"with --chat_format")
    return end


# ----------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Byte-level BPE (Rust `tokenizers`) + special-token ids + a chat template renderer.

    chat_format: the renderer (see the module docstring): a CHAT_FORMATS name, "jinja", or None
        when the folder has no chat template.
    end_of_turn_text, end_of_turn_ids: how the template ends an assistant turn, as text and as
        token ids (None and [] without a chat template).
    pad_token_id: the configured pad token; without one, "<|endoftext|>" if the vocabulary has
        it, else the first eos id. Padding positions are masked, so any id works; these keep it
        a token the model knows.
    eos_token_ids: the ids a generation stops on: the end-of-turn token (when it is one token),
        "<|endoftext|>" when the turns are ChatML (ends a document; a base-model habit), then the
        configured eos and any ids from generation_config.json.
    """

    def __init__(self, backend: RustTokenizer, eos_token: str, pad_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None,
                 chat_format: str | None = None, extra_eos_token_ids: tuple[int, ...] = (),
                 config: dict | None = None, source: str = "tokenizer", template_source: str | None = None):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        self.template_source = template_source or source  # the file the template was read from
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.config = dict(config or {})  # other tokenizer_config.json keys, written back by save()
        self.chat_format = choose_chat_format(chat_template, chat_format, self.template_source)
        self.own_chat_format = choose_chat_format(chat_template, None, self.template_source)  # what "auto" picks
        if self.chat_format == JINJA:
            self._render = JinjaChatTemplate(chat_template, self.special_tokens, self.template_source)
        else:
            self._render = CHAT_FORMATS.get(self.chat_format)

        eos_id = self._id_of(eos_token, "eos_token")
        self.bos_token_id = None if bos_token is None else self._id_of(bos_token, "bos_token")
        self.end_of_turn_text = None if self._render is None else find_end_of_turn(self._render, self.template_name)
        self.end_of_turn_ids = [] if self.end_of_turn_text is None else self.encode(self.end_of_turn_text)
        if self.chat_format in CHAT_FORMATS and self.end_of_turn_token_id is None:
            raise UserError(f"{source}: chat format {self.chat_format!r} needs {IM_END!r} in the vocabulary "
                            f"as one token")
        endoftext_id = backend.token_to_id(ENDOFTEXT)

        ids = [self.end_of_turn_token_id, endoftext_id if self.end_of_turn_text == IM_END else None]
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
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens that are set ({"bos_token": ..., "eos_token": ...}): the
        variables transformers gives a chat template besides the messages."""
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        for key in SPECIAL_TOKEN_KEYS:
            if key not in named:
                named[key] = _token_str(self.config, key, self.source)
        return {k: named[k] for k in SPECIAL_TOKEN_KEYS if named[k] is not None}

    @property
    def template_name(self) -> str:
        """The renderer, as error messages and load reports name it."""
        if self.chat_format == JINJA:
            return f"the chat template of {self.template_source} (rendered by Jinja)"
        return f"chat format {self.chat_format!r}"

    @property
    def chat_format_id(self) -> str | None:
        """The renderer, as a resumed run compares it: the family's name, or for Jinja the template's hash."""
        if self.chat_format != JINJA:
            return self.chat_format
        return f"jinja, template sha256 {hashlib.sha256(self.chat_template.encode()).hexdigest()[:16]}"

    def describe_chat_format(self) -> str:
        """The trainers' start-up line: the chat format the run renders with, and whether it is the
        checkpoint's own."""
        if self.chat_format == self.own_chat_format or self.chat_format == JINJA:
            return f"chat format: {self.template_name}, the checkpoint's own"
        own = "no template" if self.own_chat_format is None else f"{self.own_chat_format!r}"
        kept = ("the saved model gets this format's template" if self.chat_format in TRAINED_TEMPLATES else
                f"the saved model keeps its own template: evaluate it with --chat_format {self.chat_format}")
        return f"chat format: {self.template_name}, chosen by --chat_format (the checkpoint's own: {own}); {kept}"

    def trained_template(self) -> str | None:
        """The template to save with a model trained with this tokenizer: the checkpoint's own, or,
        when --chat_format chose another family, that family's (chat_formats.TRAINED_TEMPLATES)."""
        if self.chat_format in (self.own_chat_format, JINJA, None):
            return self.chat_template
        return TRAINED_TEMPLATES.get(self.chat_format, self.chat_template)

    @property
    def end_of_turn_token_id(self) -> int | None:
        """The end-of-turn token when the template ends a turn with exactly one token, else None."""
        return self.end_of_turn_ids[0] if len(self.end_of_turn_ids) == 1 else None

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
        if self._render is None:
            raise UserError(
                f"{self.source}: no chat template (neither 'chat_template' in tokenizer_config.json nor "
                f"chat_template.jinja); choose a renderer with --chat_format (load_tokenizer(path, chat_format=...)) "
                f"from {', '.join(CHAT_FORMATS)}"
            )
        return self._render(messages, add_generation_prompt)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `path`, with the chat template the
        tokenizer renders (trained_template: a `chat_format=` override's family template)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        config.update(eos_token=self.eos_token, pad_token=self.pad_token, bos_token=self.bos_token)
        if self.trained_template() is not None:
            config["chat_template"] = self.trained_template()
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


def _chat_template(folder: Path, config: dict, source: str) -> tuple[str | None, str]:
    """(template text or None, the file it came from). chat_template.jinja wins over the config key
    (newer transformers saves it there); the key may be a string or a list of {"name", "template"}
    from which we take "default"."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{source}: 'chat_template' is a list without a 'default' entry (has {sorted(named)})")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(f"{source}: 'chat_template' must be a string or a list of {{name, template}}")
    return template, source


def load_tokenizer(path: str | os.PathLike, chat_format: str | None = None) -> Tokenizer:
    """Load a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json, optional
    chat_template.jinja and generation_config.json), or a Hub id `org/name` from the local
    Hugging Face cache (minialign.hub). `chat_format` chooses the renderer: None or "auto",
    a CHAT_FORMATS name, or "jinja" (see the module docstring)."""
    folder = resolve_model_path(path)
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
    template, template_source = _chat_template(folder, config, source)
    return Tokenizer(
        backend, eos_token=eos, pad_token=_token_str(config, "pad_token", source),
        bos_token=_token_str(config, "bos_token", source), chat_template=template, chat_format=chat_format,
        extra_eos_token_ids=tuple(extra_eos), source=source, template_source=template_source,
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
