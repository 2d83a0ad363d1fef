"""Evaluation: the paper's scores and the audio models behind them.

  scores.py     mAP, Fréchet distance, KL, inception score, cosine (numpy, float64)
  embedding.py  the `EmbeddingModel` interface and audio-folder reading
  cnn14.py      PANNs CNN14 (FD, KL, IS) with its torchlibrosa log-mel front end
  vggish.py     VGGish (FAD) with its own log-mel front end
  clap.py       CLAP score from a local transformers ClapModel
  evaluate.py   folders in -> STAR's Table 2 (FAD, FD, KL, IS, CLAP); `star-jax evaluate` (cli.py)
"""
