"""minialign: reward modelling and DPO for Qwen-style language models, in plain PyTorch."""
from .checkpoint import load_model, save_model
from .generate import generate
from .config import ModelConfig
from .model import CausalLM, RewardModel
from .tokenizer import load_tokenizer

__all__ = ["CausalLM", "ModelConfig", "RewardModel", "generate", "load_model", "load_tokenizer", "save_model"]
