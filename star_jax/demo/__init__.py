"""Train a tiny STAR on the built-in OpenSFX corpus on CPU and speak-to-sound end to end.

  star-jax demo --workdir outputs/demo          (what `make demo` runs; 8.2 minutes on a 2-core VM)

Builds the corpus, trains vae -> stage1 -> stage2 on the tiny config, exports a bundle, generates audio
for the held-out spoken test queries (a voice never heard in training, and unseen mixtures), and writes
`outputs/demo/`: wavs, spectrogram PNGs (generated beside real) and report.md. The scores come from an
evaluator classifier trained on the real training clips: event accuracy of each generated clip against
its spoken query and a Fréchet distance in the evaluator's embedding space, each beside the same model
sampled with a zero and with a random condition. A second evaluator has also heard the VAE's reconstructions
of the training clips: it judges the event as the VAE renders it. Rerunning resumes: finished stages are skipped.
Needs the `demo` extra (scikit-learn, matplotlib): pip install -e '.[demo]'.
"""

from star_jax.demo.run import add_arguments, run

__all__ = ["add_arguments", "run"]
