"""The same workloads with transformers and TRL, for the benchmark workers (never imported by minialign).

Matched to minialign_steps: the same checkpoint (saved by minialign.save_model), the same
pairs, batch, dtype, thread count; AdamW with the same betas, eps,
weight decay and implementation (for-loop / foreach / fused: whatever build_optimizer
gives); the same schedule (cosine, no warm-up) and clipping; the reference forward live
every step. TRL's defaults that differ are set explicitly: gradient checkpointing off,
bf16 only on GPU, sequential data order (the batches minialign sees), precompute off,
no truncation, no padding to a multiple. Both references run a pair as two rows, [prompt |
chosen] and [prompt | rejected] (TRL has no prefix sharing); each step reports the pairs it
trained on and their non-pad tokens, as minialign's does (common.py: the same work unit).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.nn.functional as F

from common import peak_memory_mb, serve_steps, sync
from minialign.train import build_optimizer, learning_rate
from minialign_steps import BETA, LR, MAX_GRAD_NORM, TOTAL_STEPS


def _load(checkpoint, reward: bool, dtype: str, device):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    # fp32 weights in both cases: bf16 runs autocast over fp32 master weights, as minialign does.
    return cls.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").to(device)


def _autocast(dtype, device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def _loop_step(model, loss_fn, batches, device):
    """A plain loop: loss -> backward -> clip -> AdamW (built as minialign builds it) -> zero_grad."""
    optimizer = build_optimizer(model, LR, weight_decay=0.0)
    state = {"step": 0}
    model.train()

    def step():
        i = state["step"]
        batch = batches[i % len(batches)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i, TOTAL_STEPS, LR, 0.0)
        loss = loss_fn(batch)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return batch.input_ids.shape[0] // 2, int(batch.attention_mask.sum())  # pairs, two-row tokens

    return step


def hf_loop_dpo_worker(conn, checkpoint, batches, dtype, device):
    """DPO written the plain way on the transformers model: full [2B, T, V] logits, log_softmax, gather."""
    device = torch.device(device)
    batches = [b.to(device) for b in batches]
    policy = _load(checkpoint, False, dtype, device)
    ref = _load(checkpoint, False, dtype, device).eval().requires_grad_(False)

    def logps(model, batch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        labels = batch.labels[:, 1:]
        mask = labels != -100
        token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (token * mask).sum(-1)  # (2B,)

    def loss_fn(batch):
        with _autocast(dtype, device):
            pc, pr = logps(policy, batch).chunk(2)
            with torch.no_grad():
                rc, rr = logps(ref, batch).chunk(2)
        return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()

    serve_steps(conn, _loop_step(policy, loss_fn, batches, device), device)


def hf_loop_rm_worker(conn, checkpoint, batches, dtype, device):
    """Bradley-Terry on transformers' sequence-classification model."""
    device = torch.device(device)
    batches = [b.to(device) for b in batches]
    model = _load(checkpoint, True, dtype, device)

    def loss_fn(batch):
        with _autocast(dtype, device):
            r = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        chosen, rejected = r.squeeze(-1).float().chunk(2)
        return -F.logsigmoid(chosen - rejected).mean()

    serve_steps(conn, _loop_step(model, loss_fn, batches, device), device)


# ----------------------------------------------------------------------------------------
# TRL: its trainers run their own loop, so a callback pauses it between rounds


def word_tokenizer(vocab_size: int, pad_id: int, eos_id: int):
    """A tokenizer whose text "t5 t17 t3" is exactly the ids [5, 17, 3], so TRL tokenizes the
    very token ids minialign was given (its own tokenization runs once, before timing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token=f"t{pad_id}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{pad_id}", eos_token=f"t{eos_id}")


def _text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


class _PauseBetweenRounds:
    """Times on_step_begin -> on_step_end (forward, backward, clip, optimizer step; the batch is
    already collated by then) and hands control to the parent between rounds."""

    def __init__(self, conn, work_per_step, device):
        self.conn, self.work, self.device = conn, work_per_step, device
        self.left, self.seconds, self.done, self.t0 = 0, [], 0, 0.0
        conn.send({"ready": True, "peak_mb": peak_memory_mb(device)})

    def on_step_begin(self, *args, **kwargs):
        if self.left == 0:
            if self.seconds:
                n = len(self.seconds)
                work = [self.work[(self.done - n + k) % len(self.work)] for k in range(n)]  # (pairs, tokens) each
                self.conn.send({"seconds": self.seconds, "pairs": [w[0] for w in work], "tokens": [w[1] for w in work],
                                "peak_mb": peak_memory_mb(self.device)})
            cmd = self.conn.recv()
            if cmd[0] == "stop":
                self.conn.send({"stopped": True})
                os._exit(0)  # leave the trainer's loop where it stands
            self.left, self.seconds = cmd[1], []
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        sync(self.device)
        self.seconds.append(time.perf_counter() - self.t0)
        self.left -= 1
        self.done += 1


def _callback(pauser):
    from transformers import TrainerCallback

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            pauser.on_step_begin()

        def on_step_end(self, args, state, control, **kw):
            pauser.on_step_end()

    return Pause()


def _common_args(B, dtype, device, optim):
    return dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=B, gradient_accumulation_steps=1,
        max_steps=TOTAL_STEPS, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, optim=optim,
        gradient_checkpointing=False, bf16=dtype == "bf16", fp16=False, use_cpu=device.type == "cpu",
        train_sampling_strategy="sequential", max_length=None, pad_to_multiple_of=None, disable_dropout=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )


def matching_optim(model) -> str:
    """The transformers `optim` name of the AdamW implementation minialign's build_optimizer picks."""
    defaults = build_optimizer(torch.nn.Linear(1, 1), LR, 0.0).defaults
    if defaults.get("fused"):
        return "adamw_torch_fused"
    return "adamw_torch"


def trl_dpo_worker(conn, checkpoint, items, order, vocab_size, pad_id, eos_id, dtype, device, work_per_step):
    """TRL's DPOTrainer on the pairs `items`, fed in the order of the batches `order` (lists of indices)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    device = torch.device(device)
    rows = [items[i] for idx in order for i in idx]
    data = Dataset.from_dict({
        "prompt": [_text(p.prompt_ids) for p in rows],
        "chosen": [" " + _text(p.chosen_ids) for p in rows],
        "rejected": [" " + _text(p.rejected_ids) for p in rows],
    })
    policy = _load(checkpoint, False, dtype, device)
    ref = _load(checkpoint, False, dtype, device)
    args = DPOConfig(**_common_args(len(order[0]), dtype, device, matching_optim(policy)), beta=BETA,
                     loss_type=["sigmoid"], precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                         processing_class=word_tokenizer(vocab_size, pad_id, eos_id))
    pauser = _PauseBetweenRounds(conn, work_per_step, device)
    trainer.add_callback(_callback(pauser))
    trainer.train()


def trl_rm_worker(conn, checkpoint, items, order, vocab_size, pad_id, eos_id, dtype, device, work_per_step):
    """TRL's RewardTrainer; the pairs are given already tokenized (prompt + answer ids)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    device = torch.device(device)
    rows = [items[i] for idx in order for i in idx]
    data = Dataset.from_dict({
        "chosen_ids": [p.prompt_ids + p.chosen_ids for p in rows],
        "rejected_ids": [p.prompt_ids + p.rejected_ids for p in rows],
    })
    model = _load(checkpoint, True, dtype, device)
    args = RewardConfig(**_common_args(len(order[0]), dtype, device, matching_optim(model)))
    trainer = RewardTrainer(model=model, args=args, train_dataset=data,
                            processing_class=word_tokenizer(vocab_size, pad_id, eos_id))
    pauser = _PauseBetweenRounds(conn, work_per_step, device)
    trainer.add_callback(_callback(pauser))
    trainer.train()
