"""What the scripts share at the command line: a parser whose mistakes are one line, typed
flags that check their range when they are parsed, and the error boundary.

The error boundary (`run_main`) is the one place where a `UserError` (minialign.errors) turns
into `error: <message>` on stderr and exit status 2. Any other exception is a bug in minialign
and keeps its traceback. `--debug` (or MINIALIGN_DEBUG=1) shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys

from .data import FORMATS, PKU_LABEL_KEYS
from .errors import NothingToDo, UserError
from .lora import DEFAULT_TARGETS, LoRAConfig
from .prepare import DataConfig
from .tokenizer import CHAT_FORMAT_CHOICES
from .train import TrainConfig

DEBUG_ENV = "MINIALIGN_DEBUG"
USAGE_ERROR = 2  # the exit status argparse uses for a bad command line; we use it for every user error
# A learning rate above this is far beyond fine-tuning's (DPO ~5e-7, reward models ~1e-5, LoRA ~1e-4)
# and is most often a typo (5e7 for 5e-7) that destroys the model: it needs --large_lr to confirm.
LARGE_LR = 1e-2
# Failures of the machine around the run, not of minialign: a folder it may not write, a full disk,
# a quota, a file-size limit (ulimit -f). Reported in one line, like a user's mistake.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with every flag's default shown in --help and a mistake reported in one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse prints the whole usage block first; one line that names the flag is enough,
        # and --help is there for the rest.
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout, and append "(default: X)" to every flag's help."""


# ------------------------------------------------------------------ flag types with ranges

def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high] (either end open when None)."""
    def parse(text):
        value = _number(int, text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {_describe(low, high, True, True)}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False):
    """An argparse type: a finite number in the interval [low, high], `(` / `)` where open."""
    def parse(text):
        value = _number(float, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_describe(low, high, not low_open, not high_open)}")
        return value
    parse.__name__ = "number"
    return parse


def _describe(low, high, low_closed: bool, high_closed: bool) -> str:
    if high is None:
        return f"the allowed range (must be {'>=' if low_closed else '>'} {low:g})"
    if low is None:
        return f"the allowed range (must be {'<=' if high_closed else '<'} {high:g})"
    return f"the allowed range {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)

# The spellings users type for the two training precisions.
TRAIN_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
EVAL_DTYPES = {**TRAIN_DTYPES, "fp16": "fp16", "float16": "fp16"}


def train_dtype(text: str) -> str:
    """--dtype of the trainers: fp32 / float32, or bf16 / bfloat16 (autocast, fp32 master weights)."""
    key = text.lower()
    if key in ("fp16", "float16", "half"):
        raise argparse.ArgumentTypeError(
            "fp16 training is not supported: its 5-bit exponent overflows without loss scaling, "
            "which minialign does not implement; use bf16 (same speed on GPUs that have it) or fp32")
    if key not in TRAIN_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(TRAIN_DTYPES)}")
    return TRAIN_DTYPES[key]


def eval_dtype(text: str) -> str:
    """--dtype of evaluation (weights as loaded): fp32, bf16 or fp16 in any usual spelling."""
    key = text.lower()
    if key not in EVAL_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(EVAL_DTYPES)}")
    return EVAL_DTYPES[key]


# --------------------------------------------------------------------- the trainers' flags

def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags both trainers share, in four groups. --batch_size is per rank: the global batch is
    batch_size x grad_accum x world_size pairs."""
    add_data_flags(parser)
    add_run_folder_flags(parser)
    add_optimisation_flags(parser)
    add_lora_and_parallel_flags(parser)
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Which model, which pairs, and how they are cut to length."""
    g = parser.add_argument_group("model and data (give both, or neither for the demo world)")
    g.add_argument("--model", help="Hugging Face checkpoint folder (config.json, safetensors, tokenizer files), "
                                   "or a Hub id (org/name) already downloaded into the local Hugging Face cache")
    g.add_argument("--data", help="training preferences (.json, .jsonl, .gz)")
    g.add_argument("--data_format", default="auto", choices=("auto", *FORMATS), help="override format detection")
    g.add_argument("--chat_format", default="auto", choices=CHAT_FORMAT_CHOICES,
                   help="chat template renderer: auto (a known family in plain Python, any other template with "
                        "Jinja), a family by name, or jinja")
    g.add_argument("--eval_data", help="held-out preferences (default: --eval_split of --data)")
    g.add_argument("--eval_split", type=float_range(0.0, 1.0, high_open=True), default=0.1,
                   help="share of --data's distinct prompts held out when --eval_data is absent (0: no eval)")
    g.add_argument("--strict", action="store_true", help="any skipped record is an error instead of a counted skip")
    g.add_argument("--pku_label_key", default="better_response_id", choices=PKU_LABEL_KEYS,
                   help="PKU-SafeRLHF: which label decides the chosen response")
    g.add_argument("--max_length", type=int_range(2), default=512, help="max tokens of prompt + response")
    g.add_argument("--max_prompt_length", type=positive_int, default=None,
                   help="max prompt tokens, the prompt's end kept (default: half of --max_length)")
    g.add_argument("--truncation", default="keep_end", choices=("keep_end", "drop"),
                   help="over-long pairs: cut the prompt's start (answers stay whole), or drop the pair")


def add_run_folder_flags(parser: argparse.ArgumentParser) -> None:
    """Where the run lives, and what it keeps (docs/run_folders.md)."""
    o = parser.add_argument_group("run folder")
    o.add_argument("--output", help="run folder: metrics.jsonl, curves.png, checkpoints/, model/")
    o.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    o.add_argument("--resume_anyway", action="store_true",
                   help="with --resume: continue although settings that must not change did")
    o.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output that holds one (the whole previous run is moved into previous-<time>/)")
    o.add_argument("--save_every", type=non_negative_int, default=0, help="checkpoint every N steps (0: none)")
    o.add_argument("--save_total_limit", type=non_negative_int, default=2,
                   help="keep this many newest checkpoints of this run (0: all)")
    o.add_argument("--save_dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="dtype of the final model (auto: fp32, or the starting checkpoint's bf16 where that keeps "
                        ">= 99 %% of the update; what the save keeps is measured and printed)")


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """AdamW, the schedule, batching and the numerics of a step."""
    t = parser.add_argument_group("optimisation")
    t.add_argument("--epochs", type=positive_float, default=1.0, help="passes over the training pairs")
    t.add_argument("--max_steps", type=positive_int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate")
    t.add_argument("--large_lr", action="store_true",
                   help=f"confirm an --lr above {LARGE_LR:g} (without it such a value is refused as a likely typo)")
    t.add_argument("--weight_decay", type=non_negative_float, default=0.0,
                   help="AdamW decoupled weight decay (never on norms and biases)")
    t.add_argument("--warmup_ratio", type=float_range(0.0, 1.0, high_open=True), default=0.03,
                   help="share of steps of linear warm-up before cosine decay")
    t.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="clip the global gradient norm to this")
    t.add_argument("--batch_size", type=positive_int, default=4, help="pairs per rank per micro-step")
    t.add_argument("--grad_accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--eval_batch_size", type=positive_int, default=None, help="pairs per rank per eval step "
                   "(default: --batch_size)")
    t.add_argument("--group_by_length", action="store_true", help="batch pairs of similar length to cut padding")
    t.add_argument("--prefix_sharing", action=argparse.BooleanOptionalAction, default=True,
                   help="one row [prompt | chosen | rejected] per pair, the prompt computed once (exact); "
                        "--no-prefix_sharing: chosen and rejected as two rows")
    t.add_argument("--pad_to_multiple_of", type=positive_int, default=None,
                   help="round each batch's length up (default: 8 on a GPU, for tensor cores and the attention "
                        "mask's alignment; none on the CPU)")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each layer in backward: less memory, ~10-30%% more time")
    t.add_argument("--dtype", type=lambda s: "auto" if s == "auto" else train_dtype(s), default="auto",
                   help="auto (bf16 on a GPU that has it, else fp32), fp32/float32, or bf16/bfloat16 "
                        "(autocast matmuls, fp32 master weights)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="initialisation, data order and split")


def add_lora_and_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """Low-rank adapters, logging, and how the ranks work together."""
    lo = parser.add_argument_group("LoRA (minialign/lora.py; docs/lora.md)")
    lo.add_argument("--lora_rank", type=non_negative_int, default=0,
                    help="train rank-r adapters on the frozen model instead of every weight (0: full fine-tuning)")
    lo.add_argument("--lora_alpha", type=positive_float, default=16.0, help="the adapters' update is scaled by alpha / r")
    lo.add_argument("--lora_dropout", type=float_range(0.0, 1.0, high_open=True), default=0.0,
                    help="dropout on the adapters' input")
    lo.add_argument("--lora_targets", type=lora_targets, default=DEFAULT_TARGETS, metavar="NAMES",
                    help="comma-separated projections to adapt, among " + ",".join(DEFAULT_TARGETS))
    r = parser.add_argument_group("logging and data parallel")
    r.add_argument("--log_every", type=non_negative_int, default=1, help="progress line every N steps (0: at the end)")
    r.add_argument("--eval_every", type=non_negative_int, default=0, help="evaluate every N steps (0: at the end)")
    r.add_argument("--bucket_mb", type=positive_float, default=25.0, help="gradient all-reduce bucket size in MB")
    r.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the ranks with torch's FSDP2, for models "
                        "whose replicated copies do not fit (docs/memory.md); --bucket_mb then does not apply")
    r.add_argument("--dist_timeout", type=positive_int, default=1800,
                   help="seconds before a collective that waits for a stuck rank fails")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")


def check_training_args(parser: argparse.ArgumentParser, args) -> None:
    """The checks that involve two flags (a mistake is reported like a parse error, one line)."""
    if (args.model is None) != (args.data is None):
        parser.error(f"--{'data' if args.model else 'model'} is missing: give both --model and --data, "
                     f"or neither for the demo world")
    if args.eval_data and args.model is None:
        parser.error("--eval_data needs --model and --data too")
    if args.max_prompt_length is not None and args.max_prompt_length >= args.max_length:
        parser.error(f"--max_prompt_length {args.max_prompt_length} must be below --max_length {args.max_length}")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    if args.resume_anyway and not args.resume:
        parser.error("--resume_anyway only makes sense with --resume")
    lora_flags = [f"--{k}" for k in ("lora_alpha", "lora_dropout", "lora_targets") if getattr(args, k) != parser.get_default(k)]
    if lora_flags and not args.lora_rank:
        parser.error(f"{', '.join(lora_flags)} needs --lora_rank > 0 (0 is full fine-tuning, without adapters)")
    if args.lr > LARGE_LR and not args.large_lr:
        parser.error(f"--lr {args.lr:g} is above {LARGE_LR:g}, far above what fine-tuning uses (DPO ~5e-7, reward "
                     f"models ~1e-5): a typo such as 5e7 for 5e-7? Pass --large_lr to train with it anyway")


def lora_targets(text: str) -> tuple[str, ...]:
    """--lora_targets: comma-separated projection names, each one of lora.DEFAULT_TARGETS."""
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # in order, once each
    unknown = [t for t in names if t not in DEFAULT_TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or repr(text)}: not a projection name; give some of "
                                         f"{','.join(DEFAULT_TARGETS)}")
    return names


def lora_config(args) -> LoRAConfig | None:
    """The adapters' settings from the flags; None for full fine-tuning (--lora_rank 0)."""
    if not args.lora_rank:
        return None
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)


def data_config(args) -> DataConfig:
    return DataConfig(data=args.data, eval_data=args.eval_data, eval_split=args.eval_split,
                      data_format=args.data_format, strict=args.strict, pku_label_key=args.pku_label_key,
                      max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                      truncation=args.truncation, seed=args.seed)


def train_config(args, dtype: str, run_settings: dict) -> TrainConfig:
    """The loop's TrainConfig from the parsed flags (dtype already resolved from "auto")."""
    return TrainConfig(
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
        grad_accum=args.grad_accum, eval_batch_size=args.eval_batch_size, group_by_length=args.group_by_length,
        prefix_sharing=args.prefix_sharing,
        pad_to_multiple_of=args.pad_to_multiple_of, dtype=dtype, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every, save_every=args.save_every, save_total_limit=args.save_total_limit,
        resume=args.resume, resume_anyway=args.resume_anyway, run_settings=run_settings)


def run_settings(args, **objective_settings) -> dict:
    """What a resumed run must share with the run it continues, besides the data (recorded in
    every checkpoint and compared on --resume): the model, the optimisation, the objective."""
    return {"model": str(args.model), "seed": args.seed, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup_ratio": args.warmup_ratio, "max_grad_norm": args.max_grad_norm,
            "group_by_length": args.group_by_length,
            "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                     "targets": list(args.lora_targets)} if args.lora_rank else None,  # LoRA (#29)
            **objective_settings}


# ------------------------------------------------------------------------- error boundary

def debug_requested(argv) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2.

    Under torchrun every rank that fails prints its line (rank 0 unprefixed, the others with
    their rank), since a mistake may be local to one node (a file missing on its disk)."""
    try:
        return main(argv)
    except NothingToDo as e:  # e.g. --resume of a finished run: say so, change nothing, succeed
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(e, flush=True)
        return None
    except (UserError, OSError) as e:
        if debug_requested(argv) or (isinstance(e, OSError) and not isinstance(e, UserError)
                                     and e.errno not in WRITE_ERRNOS):
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        prefix = "error: " if rank == 0 else f"error (rank {rank}): "
        message = str(e) if isinstance(e, UserError) else write_failure(e)
        print(prefix + " ".join(message.split("\n")), file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)


def write_failure(e: OSError) -> str:
    """One line for a write the machine refused (WRITE_ERRNOS), naming the file and what to check."""
    where = f"cannot write {e.filename}" if e.filename else "a write failed"
    return (f"{where}: {e.strerror or e} (check the folder's permissions, the free disk space, the quota and "
            f"the file-size limit, ulimit -f; files already complete, such as earlier checkpoints, are intact)")


__all__ = [
    "add_training_args", "check_training_args", "data_config", "lora_config", "lora_targets", "train_config", "run_settings", "ArgumentParser", "HelpFormatter", "int_range", "float_range", "positive_int", "non_negative_int",
    "positive_float", "non_negative_float", "train_dtype", "eval_dtype", "run_main", "debug_requested",
]
