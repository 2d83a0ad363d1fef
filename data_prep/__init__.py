"""AudioCaps/AudioSet and OpenSFX -> ArrayRecord datasets; `python -m data_prep` = `star-jax prepare`."""
