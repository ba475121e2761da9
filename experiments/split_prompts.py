"""Split a preference file by prompt into train / dev / held-out files, once, so that the
reward model, DPO and every evaluation use the identical held-out prompts.

    python experiments/split_prompts.py SRC OUT_DIR --eval_prompts 300 --dev_prompts 48 --seed 0

Writes OUT_DIR/{train,dev,heldout}.jsonl: the source's own JSON lines (records the loader
skips are left out), so the files load exactly like the source. No prompt is in two files.
  heldout  --eval_prompts prompts: only for the final evaluation, never for choices
  dev      --dev_prompts prompts taken from the training side: the trainers' in-training
           evaluation (curves), and the place to tune if one tunes at all
  train    the rest, or a seeded subset of --train_pairs of it (a quick run); the held-out
           and dev files do not change with --train_pairs
OUT_DIR/split.json records the counts.
"""
import argparse
import gzip
import json
import random
from pathlib import Path

from minialign.data import load_preferences, split_by_prompt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--eval_prompts", type=int, default=300, help="distinct prompts held out")
    p.add_argument("--dev_prompts", type=int, default=48, help="distinct training-side prompts set aside as dev")
    p.add_argument("--train_pairs", type=int, default=None, help="keep a seeded subset of this many train pairs (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    pairs, report = load_preferences(args.src)
    print(report.summary())
    train, heldout = split_by_prompt(pairs, eval_size=args.eval_prompts, seed=args.seed)
    train, dev = split_by_prompt(train, eval_size=args.dev_prompts, seed=args.seed + 1)
    if args.train_pairs is not None and args.train_pairs < len(train):
        keep = sorted(random.Random(args.seed).sample(range(len(train)), args.train_pairs))
        train = [train[i] for i in keep]

    opener = gzip.open if args.src.endswith(".gz") else open
    with opener(args.src, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()  # pair.line is the 1-based line number in this file
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("dev", dev), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(lines[pair.line - 1] + "\n" for pair in part), encoding="utf-8")
    counts = {"source": args.src, "read": report.read, "kept": report.kept, "skipped": report.skipped,
              "seed": args.seed, "eval_prompts": args.eval_prompts,
              "dev_prompts": args.dev_prompts, "train_pairs": len(train), "dev_pairs": len(dev),
              "heldout_pairs": len(heldout)}
    (out / "split.json").write_text(json.dumps(counts, indent=2) + "\n")
    print(f"train {len(train)} pairs, dev {len(dev)}, held-out {len(heldout)} ({args.eval_prompts} prompts) -> {out}")


if __name__ == "__main__":
    main()
