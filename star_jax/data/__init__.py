"""Data: the record format, data prep (AudioCaps, OpenSFX), TTS and the grain input pipeline."""
