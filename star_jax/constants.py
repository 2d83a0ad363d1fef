"""Rates and names shared by the data, the models, the stages and the tools (DESIGN.md §1-2)."""

SPEECH_RATE_HZ = 16000  # HuBERT reads 16 kHz speech
FRAME_RATE_HZ = 50      # HuBERT frames and VAE latents per second (both variants: 24 kHz / 480, 16 kHz / 320)
STAGES = ("vae", "tta", "stage1", "stage2", "meanflow")  # in training order; each is a `--stage` and a config section
