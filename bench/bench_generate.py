"""Batched KV-cache decoding: minialign.generate against transformers' generate.

    /work/refenv/bin/python bench/bench_generate.py          # with the transformers column
    python bench/bench_generate.py                           # minialign only
    python bench/bench_generate.py --quick                   # small shape, fewer tokens

Greedy, batch 8, 128 new tokens, prompts of 16 to 128 random tokens (left padded), the same
random-initialised checkpoint loaded by both, one process, rounds alternating between the two.
tokens/s = generated tokens (every row, up to its EOS) / wall time of the generate call,
prefill included. Both are asked for the same work: EOS is suppressed on both sides
(minialign: no EOS id; transformers: min_new_tokens), so every row runs the full length,
and the greedy tokens of the two are compared as a check that they did the same computation.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import torch

from common import SHAPES, Report, device_and_dtype, environment, save_random_checkpoint, sync
from minialign import load_model
from minialign.collate import collate_prompts
from minialign.generate import generate_tokens


def random_prompts(shape, batch, low, high, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = SHAPES[shape]["pad_token_id"]
    lengths = torch.randint(low, high + 1, (batch,), generator=g).tolist()
    return [torch.randint(0, top, (n,), generator=g).tolist() for n in lengths]


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen0.5b-4l,qwen0.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.new_tokens, args.rounds = "small", 32, 2
    torch.set_num_threads(args.threads)
    device, dtype = device_and_dtype()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    print("environment:", environment(), flush=True)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        AutoModelForCausalLM = None
        print("transformers is not installed: minialign only (run with /work/refenv/bin/python for the ratio)")

    report = Report(f"greedy generation, batch {args.batch}, {args.new_tokens} new tokens ({dtype}, {args.threads} threads)")
    tmp = tempfile.mkdtemp(prefix="bench_gen_")
    try:
        for shape in args.shapes.split(","):
            cfg = SHAPES[shape]
            ckpt = save_random_checkpoint(shape, f"{tmp}/{shape}")
            prompts = random_prompts(shape, args.batch, 16, 128)
            ours = load_model(ckpt, dtype=torch_dtype, device=device)

            def run_ours():
                ids, _ = generate_tokens(ours, prompts, [], cfg["pad_token_id"], args.new_tokens, temperature=0.0)
                return ids

            runs = [("minialign", run_ours)]
            if AutoModelForCausalLM is not None:
                theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype, attn_implementation="sdpa").to(device)
                theirs.eval()
                padded = collate_prompts(prompts, cfg["pad_token_id"])
                ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)

                @torch.no_grad()
                def run_theirs():
                    out = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=cfg["pad_token_id"], eos_token_id=cfg["eos_token_id"])
                    return out[:, ids.shape[1]:].tolist()

                runs.append(("transformers", run_theirs))
            rates = {name: [] for name, _ in runs}
            outputs = {}
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, fn in runs[r % len(runs):] + runs[: r % len(runs)]:
                    out, seconds = timed(fn, device)
                    outputs[name] = out
                    if r > 0:
                        rates[name].append(sum(len(row) for row in out) / seconds)
            same = None
            if "transformers" in outputs:
                a, b = outputs["minialign"], outputs["transformers"]
                same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(len(r) for r in a)
            ratios = [a / b for a, b in zip(rates["minialign"], rates.get("transformers", []))]
            for name in rates:
                report.add(name=f"generate/{name}", shape=shape, dtype=dtype, batch=args.batch,
                           new_tokens=args.new_tokens, tokens_per_s=statistics.median(rates[name]),
                           ratio=statistics.median(ratios) if ratios and name == "minialign" else None,
                           same_greedy_tokens=same if name == "minialign" else None)
            del ours
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.table(["name", "shape", "batch", "new_tokens", "tokens_per_s", "ratio", "same_greedy_tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
