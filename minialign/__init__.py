"""minialign: reward modelling and DPO for Qwen-style language models, in plain PyTorch."""
from .checkpoint import load_model, save_model
from .generate import generate
from .model import CausalLM, ModelConfig, RewardModel
from .tokenizer import load_tokenizer

__all__ = ["CausalLM", "ModelConfig", "RewardModel", "generate", "load_model", "load_tokenizer", "save_model"]
