"""Train a tiny STAR on the built-in OpenSFX corpus on CPU and speak-to-sound end to end.

  star-jax demo --workdir outputs/demo          (what `make demo` runs; docs/demo.md has its time and figures)

Builds the corpus, trains stage1 -> stage2 on the tiny config (its codec is the fixed mel codec; with
`--set vae.kind=oobleck` a tiny VAE trains first), exports a bundle, generates audio for the held-out spoken
test queries (a voice never heard in training, and unseen mixtures), and writes the workdir's wavs/,
spectrograms/, report.md and the listening page report.html. The scores come from an evaluator classifier
trained on the real training clips: event accuracy of each generated clip against its spoken query and a
Fréchet distance in the evaluator's embedding space, each beside the same model sampled with a zero and with a
random condition. Rerunning resumes: finished stages are skipped.
Needs the `demo` extra (scikit-learn, matplotlib): pip install -e '.[demo]'.
"""

from star_jax.demo.run import add_arguments, run

__all__ = ["add_arguments", "run"]
