"""The attnserve transformer: definition, config presets, KV cache, training and checkpoints."""
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, preset
from model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "load_checkpoint", "save_checkpoint"]
