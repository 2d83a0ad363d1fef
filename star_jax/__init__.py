"""star-jax: STAR end-to-end speech-to-audio generation in JAX/Flax.

HuBERT speech encoder -> Q-Former bridge -> flow-matching DiT -> Oobleck VAE decoder.
Importing the package does no I/O and touches no device.
"""

__version__ = "0.1.0"
