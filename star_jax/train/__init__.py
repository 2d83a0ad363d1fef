"""Training: train state and optimizers, one pure step per stage, the loop, the `star-jax train` CLI."""
