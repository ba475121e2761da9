"""Chat formats minialign writes in plain Python: messages -> the prompt string.

A chat template is a Jinja program shipped with a checkpoint (tokenizer_config.json). The
families minialign knows all write their conversations in ChatML, each turn being

    <|im_start|>{role}\n{content}<|im_end|>\n

and differ only in small ways (a default system prompt, Qwen3's empty <think> block). Each
family is one short function below that reproduces the official template for plain
system/user/assistant conversations (no tools, no images); tests compare them with strings
rendered by the official Jinja templates. `detect_chat_format` recognises a family from a
distinctive substring of the template; any other template is rendered by Jinja itself, the
way transformers renders it (minialign/chat_jinja.py).
"""
from __future__ import annotations

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
# Templates that render plain system/user/assistant conversations as a family's Python renderer
# does: what a model trained with --chat_format FAMILY saves, so that whoever loads it later
# (minialign, transformers) renders the format it was trained in. Qwen2.5's official template is
# long (tools); for plain conversations it is ChatML after a default system turn, written even for
# an empty conversation (render_qwen2_5). Qwen3's rules need its official template (not carried).
TRAINED_TEMPLATES = {
    **SHORT_TEMPLATES,
    "qwen2.5": ("{% if not messages or messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                + QWEN2_5_SYSTEM + "<|im_end|>\\n' }}{% endif %}" + CHATML_TEMPLATE),
}


# ----------------------------------------------------------------------------------------
# Chat formats: messages -> prompt string


def check_messages(messages: list[dict]) -> None:
    """Every message is {"role": system|user|assistant, "content": str}, or a ValueError names it."""
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
    check_messages(messages)
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
    check_messages(messages)
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
    check_messages(messages)
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


def detect_chat_format(template: str) -> str | None:
    """Name the plain-Python chat format of a Jinja template from distinctive text in it, or
    None when it is none of them (the template is then rendered by Jinja).

    Checked in this order (the first match wins):
      qwen3    contains "enable_thinking" and "last_query_index" (the hybrid-thinking Qwen3
               template; the 2507 Instruct/Thinking templates lack "enable_thinking")
      qwen2.5  contains Qwen2.5's default system prompt "You are Qwen, created by Alibaba Cloud."
      smollm2  contains "You are a helpful AI assistant named SmolLM"
      qwen2    contains "You are a helpful assistant.<|im_end|>" (Qwen2 / Qwen1.5 default system)
      chatml   equals the standard ChatML template (`CHATML_TEMPLATE`) up to whitespace; plain
               ChatML has nothing distinctive, so any variation of it goes to Jinja rather than
               being guessed.
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
    return None
