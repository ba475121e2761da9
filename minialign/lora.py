"""LoRA by hand: low-rank adapters on frozen projections (Hu et al. 2021, "LoRA").

Fine-tuning changes a weight matrix W0 (O, I) by some dW. LoRA's bet is that dW needs only a low
rank r << min(O, I): dW = B A with B (O, r) and A (r, I), so an adapted layer computes (eq. 3)

    h = W0 x + (alpha / r) * B A x          W0 frozen; only A and B train

A starts random (Gaussian), B at zero, so that dW = 0 and the adapted model starts as the base
model, exactly. alpha / r scales dW so that trying another rank needs no new learning rate (Sec. 4.1).
B A is never formed: x goes through A, then through B, r numbers per position in between.

What it buys preference training (docs/lora.md):
  - memory: gradients and AdamW's two moments exist for A and B only, r * (I + O) numbers per
    matrix (well under 1% of a 7B model at r = 16); the frozen base needs no fp32 master copy,
    so under bf16 autocast its projection weights are held in bf16 (`hold_base_in_bf16`).
  - DPO's reference for free: the policy with its adapters switched off (`adapters_disabled`) IS
    the initial model, so no second copy of the model is loaded (dpo.AdapterOffReference).

Names: a LoRALinear keeps the nn.Linear's `weight` and `bias` under their names, so the base
model's keys do not change (`model.layers.0.self_attn.q_proj.weight`); the adapters add
`...q_proj.lora_A` (r, I) and `...q_proj.lora_B` (O, r). A run saves them two ways: merged into
the weights, a plain Hugging Face model (`merged_state`), and alone in peft's layout
(`save_adapter`: adapter_model.safetensors + adapter_config.json, keys as peft names them,
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), which peft users load with
PeftModel.from_pretrained. A reward model trains its new scalar head in full besides the adapters;
peft calls it a module to save and stores it as `base_model.model.score.weight`.

Shape legend: N any leading dimensions (batch, time), I in features, O out features, r rank.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .checkpoint import atomic_directory, save_tensors
from .errors import UserError
from .model import RewardModel

# The attention and MLP projections of every decoder layer (model.py), peft's names for them.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # peft's wrapper (PeftModel.base_model) around the HF model (.model)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_KEYS = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (dW is scaled by alpha / r), dropout on the adapters' input, the projections adapted."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS


class LoRALinear(nn.Module):
    """nn.Linear's frozen W0 and bias plus a trainable low-rank update: x (N, I) -> (N, O)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight.requires_grad_(False)  # W0 (O, I): the base model's tensor, frozen
        self.bias = base.bias.requires_grad_(False) if base.bias is not None else None  # (O,) or None
        self.scale = alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, I)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (O, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False inside adapters_disabled: the base layer alone
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self):
        """A ~ N(0, 1 / (3 I)), B = 0 (Sec. 4.1: "random Gaussian initialization for A and zero for
        B, so dW = BA is zero at the beginning"). The paper gives no variance; this one is the
        variance of nn.Linear's default init that the authors' loralib and peft use for A, so that a
        learning rate tuned with peft carries over. On the meta device (a sharded rank's empty
        model, fsdp.load_sharded) there is nothing to fill: rank 0's values arrive later."""
        if self.lora_A.is_meta:
            return
        self.lora_A.normal_(0.0, 1.0 / math.sqrt(3 * self.in_features))
        self.lora_B.zero_()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # W0 x + b: (N, O)
        if not self.enabled:
            return y
        # eq. 3: h = W0 x + (alpha / r) B A x, as x A^T (N, r), then (N, r) B^T (N, O)
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, "
                f"scale={self.scale:g}")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Freeze the whole model, then replace every nn.Linear named in cfg.targets (matched on the last
    part of its name, as peft matches target_modules) by a LoRALinear around it. A reward model
    trains its scalar head in full besides (peft's modules_to_save): it is new, random, and only C
    weights. Returns the model (changed in place)."""
    model.requires_grad_(False)
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
              and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in cfg.targets]
    found = {name.rsplit(".", 1)[-1] for name, _ in chosen}
    missing = [t for t in cfg.targets if t not in found]
    if missing:
        raise UserError(f"--lora_targets: this model has no projection named {', '.join(missing)} in its decoder "
                        f"layers; choose among {', '.join(sorted(found) or DEFAULT_TARGETS)}")
    for name, linear in chosen:
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    if isinstance(model, RewardModel):
        model.score.requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted projections by name (empty for a model without LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRALinear computes W0 x + b alone: the model is the base model again, with
    the very same tensors (no copy). A model without adapters is left as it is."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


@torch.no_grad()
def hold_base_in_bf16(model: nn.Module) -> nn.Module:
    """precision.hold_frozen_in_bf16 for a LoRA model: every frozen projection weight (adapted or
    not, lm_head included) in bf16, the dtype autocast casts it to for each matmul anyway, so the
    numbers do not change and the base takes 2 bytes per parameter instead of 4. The adapters and a
    reward head (trained: fp32 master weights), the embedding (its lookup is not autocast, and a
    tied lm_head shares it), norms and biases stay fp32. For training under --dtype bf16 only."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for m in model.modules():
        if isinstance(m, (nn.Linear, LoRALinear)) and not m.weight.requires_grad and id(m.weight) not in embeddings:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    return model


def describe_lora(model: nn.Module, cfg: LoRAConfig) -> str:
    """One start-up line: what is adapted and how many parameters train."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA r {cfg.rank}, alpha {cfg.alpha:g} (scale {cfg.alpha / cfg.rank:g}), dropout {cfg.dropout:g} on "
            f"{len(lora_modules(model))} projections ({', '.join(cfg.targets)}): {trained:,} trained parameters, "
            f"{100 * trained / total:.2f}% of {total:,}")


# ------------------------------------------------------------------------------------- saving

def merged_state(model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A LoRA model's full state (model.state_dict() or resume.full_model_state) as a plain model's:
    W = W0 + (alpha / r) B A for every adapted projection, the adapter tensors dropped. Merged in
    fp32: in bf16 the small update would be rounded away against W0. W0 is the model's own, so
    after hold_base_in_bf16 the bf16 weights training computed with. Without LoRA (or on a rank
    that holds no state, None) it is returned as it is."""
    modules = lora_modules(model)
    if state is None or not modules:
        return state
    out = {k: v for k, v in state.items() if not k.endswith(ADAPTER_KEYS)}
    for name, m in modules.items():
        W0, A, B = state[f"{name}.weight"], state[f"{name}.lora_A"], state[f"{name}.lora_B"]  # (O, I), (r, I), (O, r)
        out[f"{name}.weight"] = W0.float() + m.scale * (B.float() @ A.float())  # (O, I)
    return out


def peft_name(name: str) -> str:
    """minialign's name of a trained tensor -> peft's: `...q_proj.lora_A` -> `base_model.model....q_proj.lora_A.weight`
    (peft's lora_A is an nn.Linear), `score.weight` -> `base_model.model.score.weight`."""
    return PEFT_PREFIX + name + (".weight" if name.endswith(ADAPTER_KEYS) else "")


def minialign_name(key: str) -> str:
    """peft_name's inverse."""
    name = key.removeprefix(PEFT_PREFIX)
    return name.removesuffix(".weight") if name.endswith(tuple(k + ".weight" for k in ADAPTER_KEYS)) else name


def trained_names(model: nn.Module) -> list[str]:
    """The names of the tensors a LoRA run trains: the adapters, and a reward model's head."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors of a full state, by peft's names, as they are (fp32 master values)."""
    return {peft_name(name): state[name].detach().cpu().contiguous() for name in trained_names(model)}


def adapter_config(cfg: LoRAConfig, base_model: str, reward: bool) -> dict:
    """adapter_config.json as peft reads it (peft's LoraConfig fields; peft fills the rest with its
    defaults). The keys and values are checked against a file peft wrote (tests/fixtures/peft_lora)."""
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
            "base_model_name_or_path": str(base_model), "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
            "modules_to_save": ["score"] if reward else None, "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "inference_mode": True}


def save_adapter(folder, tensors: dict[str, torch.Tensor], cfg: LoRAConfig, base_model: str, reward: bool) -> None:
    """Write the adapters alone in peft's layout into `folder`, atomically: adapter_model.safetensors
    (tensors from adapter_state) and adapter_config.json."""
    with atomic_directory(folder) as tmp:
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})  # peft's loader expects "pt"
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, base_model, reward), indent=2))


def read_adapter(path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors by minialign's names; a damaged file is a UserError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {minialign_name(k): f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is missing or damaged ({e})") from None


@torch.no_grad()
def load_adapter(model: nn.Module, path) -> None:
    """Copy an adapter file's tensors (peft's or ours) into a LoRA model; every trained tensor must
    be there with its shape (a UserError naming the file if not)."""
    tensors = read_adapter(Path(path))
    params = dict(model.named_parameters())
    for name in trained_names(model):
        if name not in tensors or tensors[name].shape != params[name].shape:
            found = tuple(tensors[name].shape) if name in tensors else "nothing"
            raise UserError(f"{path}: '{peft_name(name)}' should be {tuple(params[name].shape)}, found {found} "
                            "(another model, rank or --lora_targets?)")
        params[name].copy_(tensors[name])


__all__ = ["LoRAConfig", "LoRALinear", "DEFAULT_TARGETS", "apply_lora", "lora_modules", "has_lora", "adapters_disabled",
           "hold_base_in_bf16", "describe_lora", "merged_state", "adapter_state", "adapter_config", "save_adapter",
           "read_adapter", "load_adapter", "trained_names", "peft_name", "minialign_name", "ADAPTER_WEIGHTS",
           "ADAPTER_CONFIG"]
