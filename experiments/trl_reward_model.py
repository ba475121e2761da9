"""TRL's RewardTrainer on the same split, the same tokens and the same settings as the minialign
reward model of bench/quality.py: the reference that says whether minialign's held-out accuracy
is what this model and these 400 pairs can give. Run with the reference venv (transformers, trl):

    PYTHONPATH=$PWD /work/refenv/bin/python experiments/trl_reward_model.py \
        --model /work/smollm2/SmolLM2-135M-Instruct --split runs/quality/data --output runs/quality/trl

The pairs are tokenized once by minialign (the chat template, the prompt cut to its last
--max_prompt_length tokens, pairs longer than --max_length dropped; TRL drops over-long pairs
too), so that both trainers see the very same token ids. TRL then runs its own loop, loss,
data order (shuffled, seeded) and the transformers model. Settings matched to train_rm.py:
fp32, batch 4 x 2 accumulation, one epoch, lr 2e-5, 3 % linear warm-up (a fraction given as
warmup_steps, transformers 5) then cosine, AdamW betas
(0.9, 0.95), no weight decay, clipping at 1.0. The held-out pairs are scored in memory, one
sequence at a time (no padding), with minialign's scoring truncation (evaluate.py rm).

One deliberate change from TRL's out-of-the-box behaviour: SmolLM2's pad token is its
end-of-turn token <|im_end|>, and transformers reads a sequence-classification reward at the
last token that is not the pad token, so with that pad the reward would be read one token
before the end of turn. Padding here uses <|endoftext|> (never in the pairs), so both libraries
read the reward at the answer's <|im_end|>. Writes OUTPUT/summary.json.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def tokenized(tokenizer, path, max_length, max_prompt_length):
    """minialign's token ids of the pairs in `path`, as train_rm.py builds them."""
    from minialign.collate import tokenize_pairs
    from minialign.data import load_preferences
    pairs, _ = load_preferences(path)
    return tokenize_pairs(tokenizer, pairs, max_length, max_prompt_length)[0]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--split", required=True, help="folder of experiments/split_prompts.py: train.jsonl, heldout.jsonl")
    p.add_argument("--output", required=True)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--max_prompt_length", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def train_trl(args, train_items):
    """TRL's RewardTrainer on minialign's token ids, at train_rm.py's settings -> (model, trainer, seconds)."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_dict({"chosen_ids": [t.prompt_ids + t.chosen_ids for t in train_items],
                              "rejected_ids": [t.prompt_ids + t.rejected_ids for t in train_items]})
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    hf_tok.pad_token = "<|endoftext|>"  # not <|im_end|>: see the module docstring
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = hf_tok.pad_token_id
    config = RewardConfig(
        output_dir=str(Path(args.output) / "trainer"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.03,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        max_length=args.max_length, gradient_checkpointing=False, bf16=False, use_cpu=True, seed=args.seed,
        report_to="none", save_strategy="no", logging_steps=5, disable_dropout=True, dataloader_num_workers=0)
    t0 = time.time()
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=hf_tok)
    trainer.train()
    return model, trainer, time.time() - t0


def score_heldout(model, ml_tok, heldout, max_length) -> dict[str, list[float]]:
    """Every held-out pair's chosen and rejected rewards, one conversation at a time."""
    from minialign.reward import conversation_ids

    model.eval()
    scores = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for pair in heldout:
            for which in scores:
                # cut as the minialign figure it is compared with was scored (2026-12-06: no separate
                # prompt budget, the prompt's start cut to fit --max_length)
                ids = conversation_ids(ml_tok, pair.prompt, getattr(pair, which), max_length)
                scores[which].append(float(model(torch.tensor([ids])).logits[0, 0]))
    return scores


def main():
    args = parse_args()
    from minialign import load_tokenizer
    from minialign.data import load_preferences
    from minialign.evaluation import accuracy_with_ties, bootstrap_ci

    ml_tok = load_tokenizer(args.model)
    train_items = tokenized(ml_tok, Path(args.split) / "train.jsonl", args.max_length, args.max_prompt_length)
    model, trainer, train_s = train_trl(args, train_items)
    heldout, _ = load_preferences(Path(args.split) / "heldout.jsonl")  # every pair, as evaluate.py rm
    scores = score_heldout(model, ml_tok, heldout, args.max_length)
    correct = np.array(scores["chosen"]) > np.array(scores["rejected"])
    summary = {**accuracy_with_ties(scores["chosen"], scores["rejected"]),
               "accuracy_ci95": bootstrap_ci(correct.astype(float), seed=args.seed),
               "train_pairs": len(train_items), "heldout_pairs": len(heldout), "train_seconds": round(train_s),
               "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
               "log": [r for r in trainer.state.log_history if "loss" in r]}
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"TRL RewardTrainer: held-out accuracy {summary['accuracy']:.3f} "
          f"(95% CI {summary['accuracy_ci95'][0]:.3f}-{summary['accuracy_ci95'][1]:.3f}, {len(heldout)} pairs)")


if __name__ == "__main__":
    main()
