"""Converters from PyTorch / Hugging Face / EzAudio / diffusers checkpoints to star-jax param trees."""
