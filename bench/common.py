"""Shared pieces of the benchmarks: model shapes, data, FLOP counts, the matmul yardstick,
worker processes that alternate rounds, and the report format.

Why worker processes: on a CPU the only peak-memory figure is the process's peak RSS,
which never goes down. Each workload (minialign DPO, TRL's DPOTrainer, ...) therefore
lives in its own child process, and the parent asks the children in turn to run a few
steps. Rounds alternate between implementations, so a burst of load from other jobs on
the machine hits both sides alike, and a ratio is read from medians of several rounds.

Work is counted in pairs. Prefix sharing (minialign/packing.py) computes a pair in fewer token
positions than the two-row layout, so a rate of "tokens the model computed" would reward doing
more work; every implementation is credited instead with the pairs it trained on, and, for
continuity with token rates, with the non-pad tokens those pairs take in the two-row layout
[prompt | chosen], [prompt | rejected] (2P + C + R per pair: two_row_tokens). Both are the same
work for every layout and implementation, so ratios of either are ratios of time for the same pairs.

Shape legend: B pairs per step, T padded length, C hidden size, V vocabulary.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

# Make `minialign` importable when the scripts run from a checkout without installing it.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minialign.collate import TokenizedPair  # noqa: E402
from minialign.config import ModelConfig  # noqa: E402
from minialign.packing import IGNORE_INDEX, PairBatch, collate, row_length  # noqa: E402

SHARED = Path(os.environ.get("MINIALIGN_SHARED", REPO.parent / "shared"))

# Qwen2.5's special tokens, pad "<|endoftext|>" and end of turn "<|im_end|>" (the same ids in the
# Qwen3 tokenizer that tokenizes the HH-RLHF pairs).
QWEN05 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
              rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
              pad_token_id=151643, eos_token_id=151645)
SHAPES = {
    # A toy of the same family, for quick runs and for memory where activations dominate.
    "small": dict(QWEN05, vocab_size=16384, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=4, pad_token_id=16382, eos_token_id=16383),
    "qwen0.5b-4l": dict(QWEN05, num_hidden_layers=4),  # the reference shape
    "qwen0.5b": dict(QWEN05, num_hidden_layers=24),  # the full Qwen2.5-0.5B shape
}



def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token: 2 x (parameters in matmuls) + attention scores and values.

    Attention per token and layer: QK^T and AV are each 2 * T * H * D multiply-adds over the
    causal half on average, i.e. 2 * 2 * (T/2) * H * D."""
    C, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    HD, KD = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = C * HD + 2 * C * KD + HD * C + 3 * C * I
    matmul_params = L * per_layer + cfg.vocab_size * C
    attention = L * 2 * 2 * (seq_len / 2) * HD
    return 2 * matmul_params + attention

def device_and_dtype():
    """fp32 on CPU, bf16 autocast where a GPU is present (the issue's rule)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), "bf16"
    return torch.device("cpu"), "fp32"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    """Peak RSS of this process on CPU (Linux reports KiB), max allocated on GPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_random_checkpoint(shape: str, path, reward: bool = False, seed: int = 0) -> Path:
    """A random-initialised model of `shape` saved with minialign.save_model: both sides load it."""
    from minialign import save_model
    from minialign.model import CausalLM, RewardModel

    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf_dict(SHAPES[shape])
    model = RewardModel(cfg) if reward else CausalLM(cfg)
    save_model(model, path)
    return Path(path)


# ----------------------------------------------------------------------------------------
# Data: lists of (prompt_ids, chosen_ids, rejected_ids), cut into batches of B pairs


def random_pairs(shape: str, n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[TokenizedPair]:
    """n pairs of random tokens; every answer ends with EOS, as real chat data does."""
    cfg = SHAPES[shape]
    low = min(cfg["pad_token_id"], cfg["eos_token_id"])  # ordinary tokens: never pad or EOS
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, low, (k,), generator=g).tolist()

    eos = [cfg["eos_token_id"]]
    return [TokenizedPair(ids(prompt_len), ids(response_len - 1) + eos, ids(response_len - 1) + eos)
            for _ in range(n)]


def hh_rlhf_pairs(max_length: int = 512, max_prompt_length: int = 256) -> list[TokenizedPair] | None:
    """The HH-RLHF harmless-base test pairs tokenized as minialign trains on them (Qwen3 tokenizer,
    qwen chat template), or None when the shared folder is absent."""
    data = SHARED / "data/hh-rlhf/harmless-base-test.jsonl.gz"
    tok_dir = SHARED / "data/qwen3-tokenizer"
    if not (data.is_file() and (tok_dir / "tokenizer.json").is_file()):
        return None
    from minialign import load_tokenizer
    from minialign.collate import tokenize_pairs
    from minialign.data import load_preferences

    pairs, _ = load_preferences(str(data))
    items, _ = tokenize_pairs(load_tokenizer(str(tok_dir)), pairs, max_length=max_length,
                              max_prompt_length=max_prompt_length, truncation="keep_end")
    return items


def fit_vocabulary(items: list[TokenizedPair], shape: str) -> list[TokenizedPair]:
    """The Qwen3-tokenized pairs with ids a smaller vocabulary can embed (the "small" shape of the
    quick runs): the end-of-turn id becomes the shape's EOS, every other id is taken modulo the
    ordinary ids (never pad or EOS). The lengths, which set the cost, are unchanged."""
    cfg = SHAPES[shape]
    if cfg["vocab_size"] >= QWEN05["vocab_size"]:
        return items
    low = min(cfg["pad_token_id"], cfg["eos_token_id"])

    def fit(ids):
        return [cfg["eos_token_id"] if i == QWEN05["eos_token_id"] else i % low for i in ids]

    return [TokenizedPair(fit(p.prompt_ids), fit(p.chosen_ids), fit(p.rejected_ids), p.line) for p in items]


LAYOUTS = ("packed", "unpacked")  # one row [prompt | chosen | rejected] per pair, or two rows per pair


def make_batches(items: list[TokenizedPair], order: list[list[int]], pad_id: int, packed: bool = False) -> list[PairBatch]:
    """Collate each index list of `order` into one right-padded minialign batch: [2B, T] rows
    (packing.collate_pairs), or with packed=True one row per pair (packing.collate_packed)."""
    return [collate([items[i] for i in idx], pad_id, packed) for idx in order]


def two_row_tokens(pairs: list[TokenizedPair]) -> int:
    """Non-pad tokens of these pairs in the two-row layout, 2P + C + R each: the work unit that
    every implementation and layout is credited with (module docstring)."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def layout_stats(items: list[TokenizedPair], order: list[list[int]], packed: bool) -> dict:
    """What a layout makes the model compute for the batches `order`, per pair:
    positions_per_pair  padded slots, B x T (packed) or 2B x T (two rows) per batch: what runs;
    real_per_pair       non-pad positions, P + C + R (packed) or 2P + C + R;
    padding             the share of slots that are padding."""
    rows_per_pair = 1 if packed else 2
    real = slots = pairs = 0
    for idx in order:
        batch = [items[i] for i in idx]
        T = max(row_length(p, packed) for p in batch)  # the batch's padded row length
        slots += rows_per_pair * len(batch) * T
        real += sum(row_length(p, True) for p in batch) + (0 if packed else sum(len(p.prompt_ids) for p in batch))
        pairs += len(batch)
    return {"positions_per_pair": slots / pairs, "real_per_pair": real / pairs, "padding": 1 - real / slots}


# ----------------------------------------------------------------------------------------
# FLOPs: matmul FLOPs of one step, and the machine's matmul rate to divide them by


def step_flops(cfg_dict: dict, batch: PairBatch, kind: str, LiveReference: bool = True) -> dict:
    """Matmul FLOPs of one training step on `batch` (either layout), two ways:

    nominal:  6 x params x positions for the trained model (+ 2 x for a reference forward), plus
              attention, as model_flops_per_token counts it: the vocabulary projection at
              every position, like a plain transformers loop computes it.
    executed: what minialign actually multiplies: the vocabulary projection only at the
              positions that predict a label (logprobs.token_logprobs), for a reward model the
              last layer's query, output and MLP projections and its attention only at the
              positions where rewards are read (model.decoder_layer_at: one per row in two rows,
              two per packed row).
    A reward model has no vocabulary projection at all (its head is C x 1).
    Both count the batch's padded slots (rows x T: 2B x T in two rows, B x T packed, T the
    batch's longest row): padding costs the same matmuls as real tokens. Attention is counted
    causally (T/2 keys per query on average) in both layouts.
    """
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    rows, T = batch.input_ids.shape
    packed = batch.packed
    tokens = rows * T
    full = model_flops_per_token(cfg, T)  # forward, per token, vocab projection included
    head = 2 * cfg.vocab_size * cfg.hidden_size  # forward FLOPs of the vocab projection, per position
    body = full - head
    if kind == "rm":
        C, HD = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        read = 2 if packed else 1  # reward positions per row
        # The last layer at T positions per row, minus what it skips at T - read of them: the q,
        # o and MLP projections, and attention (as model_flops_per_token counts it per token).
        skipped = 2 * (C * HD + HD * C + 3 * C * cfg.intermediate_size) + 2 * 2 * (T / 2) * HD
        return {"nominal": 3 * body * tokens, "executed": 3 * (body * tokens - skipped * rows * (T - read))}
    # Labelled positions: every answer token once; two rows label them shifted by one column.
    labels = batch.labels if packed else batch.labels[:, 1:]
    labelled = int((labels != IGNORE_INDEX).sum())
    ref = 1 if LiveReference else 0
    nominal = (3 + ref) * full * tokens
    executed = (3 + ref) * (body * tokens + head * labelled)
    return {"nominal": nominal, "executed": executed}


def matmul_flops_per_s(device, n: int | None = None, reps: int = 3) -> float:
    """Dense matmul rate of this machine now: median of `reps` timed n x n products
    (fp32 on CPU, bf16 on GPU, the dtypes the training steps use)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------------------
# Worker processes


def serve_steps(conn, step, device, **info):
    """Child side of the protocol for a workload given as step() -> (pairs, two-row tokens) of that step.

    Sends {"ready", **info} once, then answers each ("run", n) with the n steps' seconds, pairs
    and tokens, until ("stop",)."""
    conn.send({"ready": True, "peak_mb": peak_memory_mb(device), "runtime_mb": RUNTIME_MB.get("mb", 0.0), **info})
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            conn.send({"stopped": True})
            return
        seconds, pairs, tokens = [], [], []
        for _ in range(cmd[1]):
            sync(device)
            t = time.perf_counter()
            n_pairs, n_tokens = step()
            sync(device)
            seconds.append(time.perf_counter() - t)
            pairs.append(n_pairs)
            tokens.append(n_tokens)
        conn.send({"seconds": seconds, "pairs": pairs, "tokens": tokens, "peak_mb": peak_memory_mb(device)})


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


RUNTIME_MB = {}  # the child's RSS once Python, torch and the libraries are loaded, before any model


def _child_main(conn, threads, factory, kwargs):
    torch.set_num_threads(threads)
    RUNTIME_MB["mb"] = current_rss_mb() if os.path.exists("/proc/self/statm") else 0.0
    try:
        factory(conn, **kwargs)
    except Exception:  # report to the parent instead of leaving it waiting on the pipe
        conn.send({"error": traceback.format_exc()})


class Worker:
    """One workload in its own process: factory(conn, **kwargs) builds it and serves the protocol."""

    def __init__(self, name: str, factory, threads: int, **kwargs):
        self.name = name
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child, threads, factory, kwargs), daemon=True)
        self.proc.start()
        self.info = self._reply()  # wait until built (loading, preprocessing are not timed)

    def _reply(self) -> dict:
        msg = self.conn.recv()
        if "error" in msg:
            self.proc.join(timeout=5)
            raise RuntimeError(f"worker {self.name} failed:\n{msg['error']}")
        return msg

    def run(self, steps: int) -> dict:
        self.conn.send(("run", steps))
        return self._reply()

    def close(self):
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
                self.conn.recv()
            except (EOFError, OSError):
                pass
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()


@dataclass
class Measurement:
    """Per-round throughput of one workload. A round's rate is its work over its seconds: pairs,
    and the two-row tokens of those pairs (module docstring), the same work for every layout."""

    name: str
    rounds: list  # two-row tokens/s of each measured round
    pair_rounds: list  # pairs/s of each measured round
    round_s: list  # seconds of each measured round
    step_s: list  # every measured step's seconds
    peak_mb: float

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.rounds)

    @property
    def pairs_per_s(self) -> float:
        return statistics.median(self.pair_rounds)

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def median_round_s(self) -> float:
        return statistics.median(self.round_s)


def speedups(a: Measurement, b: Measurement) -> list[float]:
    """a's rate over b's, round by round (rounds alternate, so each ratio compares like load):
    how many times faster a trains the same pairs."""
    return [x / y for x, y in zip(a.pair_rounds, b.pair_rounds)]


def alternate(workers: list[Worker], rounds: int, steps_per_round: int, warmup_steps: int = 1,
              device="cpu", yardstick: list | None = None) -> dict[str, Measurement]:
    """Warm every worker up, then run `rounds` rounds; in each, every worker runs steps_per_round steps
    in turn. If `yardstick` is a list, the matmul rate is measured between rounds and appended to it."""
    for w in workers:
        w.run(warmup_steps)
    out = {w.name: Measurement(w.name, [], [], [], [], 0.0) for w in workers}
    for r in range(rounds):
        # Rotate who goes first, so that no worker always follows the same one.
        for w in workers[r % len(workers):] + workers[: r % len(workers)]:
            res = w.run(steps_per_round)
            m = out[w.name]
            seconds = sum(res["seconds"])
            m.rounds.append(sum(res["tokens"]) / seconds)
            m.pair_rounds.append(sum(res["pairs"]) / seconds)
            m.round_s.append(seconds)
            m.step_s += res["seconds"]
            m.peak_mb = res["peak_mb"]
        if yardstick is not None:
            yardstick.append(matmul_flops_per_s(device))
    return out


# ----------------------------------------------------------------------------------------
# Reporting: one JSON line per measurement, and a table at the end


class Report:
    def __init__(self, title: str):
        self.title = title
        self.rows: list[dict] = []

    def add(self, **row):
        """Print the measurement as one JSON line at once (so a long run shows progress)."""
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    def table(self, columns: list[str]):
        print(f"\n{self.title}")
        cells = [[_fmt(r.get(c)) for c in columns] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def environment() -> dict:
    """What the figures were measured on."""
    import platform

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for lib in ("transformers", "trl"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info
