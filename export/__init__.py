"""Turns checkpoints (trained here, or imported from GGUF or Hugging Face) into model dirs."""
