"""Chat templates minialign does not write in Python, rendered by Jinja the way transformers renders them.

A checkpoint's chat template is a small Jinja program. The families minialign knows are
re-written in plain Python (chat_formats.py); any other template (Zephyr, Llama 3, DeepSeek-R1,
a ChatML variant spelled differently, ...) runs here, in the environment that transformers 5.24
builds for `tokenizer.apply_chat_template(messages, tokenize=False)`
(transformers/utils/chat_template_utils.py, `_compile_jinja_template` and `render_jinja_template`):

  * jinja2's ImmutableSandboxedEnvironment: a template comes with a downloaded checkpoint, so it
    is untrusted code; the sandbox lets it read what it is given but not reach Python internals
    or modify lists and dicts. jinja2 older than 3.1.6 has known sandbox escapes and is refused;
  * trim_blocks and lstrip_blocks: the newline after a {% tag %} and the indentation before it
    are dropped, so a template can be laid out on many lines without changing what it writes;
  * extensions: loop controls ({% break %}, {% continue %}) and the {% generation %} block
    (transformers uses it to locate assistant text; here it renders its body unchanged);
  * globals raise_exception(message) (a template refusing a conversation), strftime_now(format)
    (the local date and time: Llama 3.2 writes "Today Date: 14 Mar 2025" into its system turn,
    so its prompts change from day to day), namespace() and dict() without access to
    underscore names; a tojson filter that, unlike Jinja's own, does not escape HTML characters;
  * variables: messages (None-valued keys dropped), add_generation_prompt, tools=None,
    documents=None, and the named special tokens of tokenizer_config.json that are set
    (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token).

The sandbox keeps a template from reaching Python's internals, not from working forever: it
bounds each range() at 100,000 steps, yet two nested loops make 10^10. So each render has a
time limit (RENDER_SECONDS, a timer signal, in the main thread where the scripts render), and
whatever a template raises (its own raise_exception, a range too big, an include with nothing to
include, recursion, memory) is one ChatTemplateError naming the template: it is the template's
fault, never minialign's.

jinja2 is an optional dependency (pip install -e ".[templates]"), imported only when a template
needs it. tests/fixtures/chat_templates_jinja.json holds strings transformers rendered, to compare.
"""
from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache

from .chat_formats import check_messages
from .errors import UserError

TEMPLATES_EXTRA = 'pip install -e ".[templates]"'  # the setup.cfg extra that installs jinja2
MIN_JINJA2 = (3, 1, 6)  # what transformers requires too: earlier versions have known sandbox escapes
# The named special tokens transformers passes to a template (PreTrainedTokenizerBase.special_tokens_map).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Seconds one render may take. A real template renders a conversation in well under a millisecond;
# a data set renders each pair three times, so a slower one is a template doing useless work.
RENDER_SECONDS = 10.0
MAX_PRODUCT_LENGTH = 10**7  # longest string or list a template may build with '*' or '+' (a prompt is far shorter)
MAX_EXPONENT = 1000  # largest power a template may compute with '**'


class ChatTemplateError(UserError):
    """The template refused a conversation (raise_exception) or failed while rendering it."""


class RenderTimeout(Exception):
    """Raised inside a render that ran past RENDER_SECONDS."""


@contextmanager
def time_limit(seconds: float):
    """Raise RenderTimeout in the block after `seconds` (SIGALRM; only in the main thread, the one
    signals reach, and where the platform has setitimer; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise RenderTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def import_jinja2(source: str):
    """jinja2, or a one-line error that says how to install it and how to avoid needing it."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise UserError(
            f"{source}: this chat template is not one minialign writes in Python, and rendering it needs jinja2, "
            f"which is not installed: {TEMPLATES_EXTRA} (or choose a built-in renderer with --chat_format)"
        ) from None
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA2:
        raise UserError(f"{source}: jinja2 {jinja2.__version__} is too old to run a chat template safely "
                        f"(sandbox escapes fixed in {'.'.join(map(str, MIN_JINJA2))}): pip install -U jinja2")
    return jinja2


def raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """json.dumps as a filter: Jinja's own tojson escapes <, >, & and ' for HTML and sorts keys."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def oversized_binop(operator: str, left, right) -> str | None:
    """What is wrong with `left operator right` before it runs, or None: a repetition or a
    concatenation longer than MAX_PRODUCT_LENGTH items, or an exponent above MAX_EXPONENT."""
    sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
    counts = [v for v in (left, right) if isinstance(v, int)]
    if operator == "*" and sizes and counts and sizes[0] * max(counts) > MAX_PRODUCT_LENGTH:
        return f"a repetition longer than {MAX_PRODUCT_LENGTH:,} items"
    if operator == "+" and sum(sizes) > MAX_PRODUCT_LENGTH:
        return f"a concatenation longer than {MAX_PRODUCT_LENGTH:,} items"
    if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
        return f"an exponent above {MAX_EXPONENT}"
    return None


def _template_helpers(jinja2):
    """What templates may use beyond the sandbox's defaults: the {% generation %} block, namespace()
    and dict(), each without a way into Python internals. Returns (GenerationBlock, Namespace, Dict)."""

    class GenerationBlock(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} renders its body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """namespace(...) that refuses underscore-prefixed names, the way into Python internals."""

        def __init__(*args, **kwargs):  # Jinja's own signature trick: self comes in args[0]
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not store {name!r} on a namespace")

    class Dict:
        """dict(...) and dict.fromkeys(...) as functions, without the dict type's attributes."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    return GenerationBlock, Namespace, Dict


def _compiled(template: str):
    """The template compiled once per text (a data set renders it three times per pair)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    GenerationBlock, Namespace, Dict = _template_helpers(jinja2)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with '*', '+' and '**' checked before they run: 'x' * 10**10 would take
        10 GB (the kernel kills the process before Python sees a MemoryError), a string doubled
        by '+' forty times as much, and 9 ** 10**9 minutes."""

        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            too_big = oversized_binop(operator, left, right)
            if too_big:
                raise jinja2.exceptions.SecurityError(too_big)
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace, dict=Dict())
    return env.from_string(template)


class JinjaChatTemplate:
    """A checkpoint's chat template run by Jinja: called like the renderers of chat_formats.py,
    render(messages, add_generation_prompt) -> str.

    special_tokens: the named special tokens the template may read ({"bos_token": "<s>", ...}).
    source: the file the template came from, for error messages.
    """

    def __init__(self, template: str, special_tokens: dict[str, str], source: str):
        jinja2 = import_jinja2(source)
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKEN_KEYS and v is not None}
        self._error = jinja2.TemplateError
        try:
            self._template = _compiled(template)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"{source}: the chat template is not valid Jinja (template line {e.lineno}: "
                            f"{e.message})") from None
        except (RecursionError, MemoryError) as e:  # nested too deeply to compile
            raise UserError(f"{source}: the chat template cannot be compiled ({type(e).__name__})") from None

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """Render; `variables` are extra template variables (e.g. date_string for Llama 3)."""
        check_messages(messages)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # a fresh copy, as transformers
        try:
            with time_limit(RENDER_SECONDS):
                return self._template.render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt,
                                             **{**self.special_tokens, **variables})
        except self._error as e:
            raise ChatTemplateError(f"{self.source}: the chat template refused the conversation: {e}") from None
        except RenderTimeout:
            raise ChatTemplateError(f"{self.source}: the chat template ran for more than {RENDER_SECONDS:g} s on one "
                                    f"conversation (loops doing useless work?); fix it, or choose a built-in "
                                    f"renderer with --chat_format") from None
        except Exception as e:  # untrusted code: anything it raises is the template's fault (module docstring)
            what = str(e).split("\n")[0][:200] or type(e).__name__
            raise ChatTemplateError(f"{self.source}: the chat template failed ({type(e).__name__}: {what}); fix it, "
                                    f"or choose a built-in renderer with --chat_format") from None


__all__ = ["JinjaChatTemplate", "ChatTemplateError", "import_jinja2", "SPECIAL_TOKEN_KEYS", "TEMPLATES_EXTRA"]
