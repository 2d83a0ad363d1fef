"""STAR: speech -> HuBERT -> Q-Former -> flow-matching DiT -> Oobleck VAE (DESIGN.md §1-2).

The paper recipe is written once, top to bottom; the `tiny` variant is one block of overrides at the end.

  paper  STAR's sizes and hyper-parameters (hubert-large-ll60k, Q-Former 2 layers, DiT-L, Oobleck 128 latents
         at 50 Hz; stage 1 AdamW 3.2e-3 batch 512; stage 2 AdamW 2.5e-5 batch 16), trained on AudioCaps:
           star-jax train --config configs/star.py:paper --stage stage2 --workdir gs://bucket/star/stage2
         Not yet trained end to end here; `star-jax plan --config configs/star.py:paper` sizes its steps.
  tiny   every stage on one CPU machine, on the built-in OpenSFX corpus; what `make demo` trains:
           make demo        (star-jax demo --workdir outputs/demo)
         Measured on a 2-core VM: 8.2 min for the whole demo; stage-1 test mAP 0.532 (chance 0.038);
         generated clips hold their query's event for 13 of 261 held-out queries by the strict evaluator,
         against 5 with a zero condition and 1 with a random one.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "paper")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/star.py: unknown variant '{variant}'; choose one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # Mesh and logical-axis rules (star_jax/sharding.py): FSDP over every device (-1 fills the rest); the batch
  # splits over data x fsdp, so the global batch must be a multiple of the device count.
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
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

  # --- Models (DESIGN.md §2).
  # HuBERT: hubert-large-ll60k, fed the raw waveform as STAR does.
  c.hubert = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                  conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                  conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
                  num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
                  normalize_waveform=False, dtype="bfloat16")
  # Bridge: the BLIP-2 Q-Former with BERT-base sizes, 32 queries, 2 layers, projected to 1024.
  c.bridge = dict(kind="qformer")  # "qformer" | "mlp"
  c.qformer = dict(num_queries=32, hidden_size=768, num_heads=12, intermediate_size=3072, num_layers=2,
                   cross_attention_frequency=2, encoder_hidden_size=1024, output_size=1024,
                   layer_norm_eps=1e-12, query_layer_norm=True, dropout_rate=0.1, dtype="bfloat16")
  c.mlp_bridge = dict(num_layers=2, hidden_size=1024, dropout=0.1, input_size=1024, dtype="bfloat16")
  # Stage 1's head: mean of the tokens -> Linear(1024, 527 AudioSet classes).
  c.classifier = dict(num_classes=527)
  # DiT: EzAudio's DiT-L (24 = 12 in + 1 mid + 12 out blocks, AdaLN-SOLA rank 32), context = the bridge's tokens.
  c.dit = dict(latent_channels=128, hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4, context_dim=1024,
               lora_rank=32, lora_alpha=32.0, remat="dots", dtype="bfloat16")
  # VAE: Stable Audio's Oobleck as EzAudio uses it: 24 kHz, 480x down -> 50 latent frames/s, 128 channels.
  c.vae = dict(sample_rate_hz=24000, audio_channels=1, encoder_hidden_size=128, decoder_channels=128,
               channel_multiples=(1, 2, 4, 8), downsampling_ratios=(2, 4, 6, 10), latent_channels=128,
               dtype="bfloat16")
  # Flow matching: Euler on the sway grid, 20 steps, CFG 5, condition dropped with probability 0.2.
  c.flow = dict(num_steps=20, cfg_scale=5.0, sway_coef=-1.0, cond_drop_prob=0.2)

  # --- Data: AudioCaps records of speech (16 kHz), audio (the VAE's rate) and labels, 10-s windows.
  c.data = dict(
      path="data/audiocaps",
      speech_sample_rate_hz=16000,
      speech_duration_s=10.0,
      audio_duration_s=10.0,
      batch_size=16,
      num_workers=8,
      shuffle_seed=0,
      text_max_tokens=32,  # rows of the records' text_emb the tta stage reads
      skip_bad_records=False,  # True: replace and count unreadable records instead of stopping (docs/recovery.md)
      sample_latents=True,  # cached VAE posteriors (prepare cache): serve mean + std·ε (False: the mean)
      # "synthesized": the train split's captions are spoken anew as they are read, a voice per example and epoch
      # from `synth`'s pool (star_jax.data.speak); held-out splits keep their stored voices. "stored": as prepared.
      speech_source="stored",
      synth=dict(espeak=True, vits_models=(), vits_share=0.5, max_caption_chars=500),
  )

  # --- Training: each stage reads its own section; `init_*` name the workdirs a stage starts from.
  c.train = dict(log_every_steps=100, checkpoint_every_steps=2000, keep_checkpoints=3,
                 nan_policy="stop")  # "stop" | "skip"
  c.vae_stage = dict(lr=1e-4, weight_decay=0.0, warmup_steps=50, schedule="constant", steps=1_000_000,
                     batch_size=32, grad_clip=1.0, kl_weight=1e-4, log_mag_eps=1e-5,
                     stft_windows=(2048, 1024, 512, 256, 128), crop_s=1.5, ema_decay=0.0,
                     mask_padding=True, random_crop=True)
  c.tta = dict(lr=1e-4, weight_decay=0.01, warmup_steps=1000, schedule="constant", steps=400_000,
               batch_size=32, grad_clip=1.0, text_dim=1024, ema_decay=0.0, init_vae="", mask_padding=True,
               random_crop=True)
  # Stage 1: AdamW 3.2e-3, wd 1e-2, batch 512, 5 warm-up epochs then linear, <= 500 epochs, stop after 20
  # epochs without a validation mAP gain; HuBERT frozen.
  c.stage1 = dict(lr=3.2e-3, weight_decay=1e-2, warmup_epochs=5, schedule="linear", max_epochs=500,
                  batch_size=512, patience_epochs=20, train_hubert=False, init_hubert="", eval_split="valid",
                  grad_clip=0.0, random_crop=True)
  # Stage 2: AdamW 2.5e-5 (STAR's code; its text says 1e-5), wd 0.01, batch 16, 1000 warm-up steps then
  # constant, grad-clip 1.0, 100 epochs; the loss covers valid (unpadded) frames only.
  c.stage2 = dict(lr=2.5e-5, weight_decay=0.01, warmup_steps=1000, schedule="constant", steps=0, epochs=100,
                  batch_size=16, grad_clip=1.0, ema_decay=0.0, init_dit="", init_bridge="", init_vae="",
                  mask_padding=True, random_crop=True)

  # --- Beyond STAR: knobs the paper does not have. These defaults reproduce the paper.
  c.dit.pooled_context = False  # True: the mean context token also drives AdaLN (EzAudio's cls_embed)
  c.dit.patch_size = 1          # latent frames per DiT token
  c.dit.abs_pe = "none"         # "sinusoidal": absolute positions on top of RoPE
  c.dit.context_slots = 0       # > 0: a learned map per context token (needs exactly that many tokens)
  c.classifier.prior_prob = 0.0     # > 0: logits start at the label prior (0: zero biases, STAR's Linear)
  c.classifier.cosine_scale = 0.0   # > 0: a cosine classifier at this scale instead of the Linear
  c.flow.latent_scale = 1.0     # the DiT works on VAE latents x this
  c.flow.sigma_mean = 0.0       # sigma ~ logit-normal(sigma_mean, 1)
  c.stage1.keep_best = True     # stage 2 reads the best validation epoch (False: the last)
  c.stage2.train_projection = True  # STAR's code trains the bridge's last projection in stage 2
  c.stage2.token_noise = 0.0    # > 0: Gaussian noise on the bridge tokens in training, x their spread over the batch
  c.vae.kind = "oobleck"        # "mel": the fixed log-mel codec below in the VAE's slot (models/mel_codec.py)
  # The mel codec: 64 bands (vae.latent_channels) at hop 320 = 50 frames/s at 16 kHz, like the VAE's latents;
  # latents = (log mel - log_mean) / log_std; decode clips the log-mel at log_ceiling, then Griffin-Lim.
  c.mel_codec = dict(n_fft=1024, hop_length=320, fmin_hz=0.0, fmax_hz=0.0, log_floor=1e-5, log_mean=-5.0,
                     log_std=4.0, log_ceiling=8.0, griffin_lim_iters=32, griffin_lim_momentum=0.99, nnls_iters=8)
  # MeanFlow few-step generation (DESIGN.md §2, docs/meanflow.md): a stage of its own (`--stage meanflow`) that
  # fine-tunes a stage-2 workdir's DiT on the average velocity with guidance w folded in, so `generate --steps 1`
  # samples in one pass. interval_prob: pairs with r < t (MeanAudio 0.25; the rest are flow matching);
  # adaptive_p/c: MeanFlow's loss weight 1/(mse + c)^p (its best, p = 1); num_steps: `generate`'s default.
  c.meanflow = dict(lr=2.5e-5, weight_decay=0.01, warmup_steps=1000, schedule="constant", steps=200_000,
                    batch_size=16, grad_clip=1.0, ema_decay=0.0, init_stage2="", interval_prob=0.25,
                    cfg_scale=c.flow.cfg_scale, adaptive_p=1.0, adaptive_c=1e-3, num_steps=1, mask_padding=True,
                    random_crop=True)

  if variant == "tiny":  # every stage in minutes on one CPU machine (docs/notes/tiny_demo.md holds the measurements)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # a model this small replicates; FSDP would only add collectives
    # HuBERT from scratch: a 2-conv front end (32-tap filterbank, stride 16, then 20-frame pooling to 50 Hz)
    # with GroupNorm left the label prior within the budget; hubert-large's 7 LayerNorm convs did not.
    c.hubert = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    conv_dim=(64, 64), conv_kernel=(32, 20), conv_stride=(16, 20),
                    conv_bias=True, feat_extract_norm="group", do_stable_layer_norm=True,
                    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layer_norm_eps=1e-5,
                    normalize_waveform=False, dtype="float32")
    # 8 queries of width 128: a better stage-1 bridge than width 32 (valid mAP 0.735 against 0.664).
    c.qformer = dict(num_queries=8, hidden_size=128, num_heads=2, intermediate_size=256, num_layers=2,
                     cross_attention_frequency=2, encoder_hidden_size=32, output_size=64,
                     layer_norm_eps=1e-12, query_layer_norm=True, dropout_rate=0.1, dtype="float32")
    c.mlp_bridge = dict(num_layers=2, hidden_size=64, dropout=0.1, input_size=32, dtype="float32")  # as above
    # OpenSFX's own label count (num_classes 0: ask the data); prior init and a cosine head let a HuBERT
    # from scratch leave the label prior and spread the classes' tokens apart (participation rank 15.4 vs 8.8).
    c.classifier = dict(num_classes=0, prior_prob=0.02, cosine_scale=16.0)
    # 2 blocks of width 128 with sinusoidal positions memorise the demo's clips fastest per second on 2 cores;
    # pooled_context and one slot per bridge token made the DiT follow its condition. One frame per token: a
    # patch of 4 frames is 256 mel values out of width 128, and the held-out queries' clips held their event
    # 0.057 with it, 0.165 with 2, 0.253 with 1 (docs/notes/demo.md).
    c.dit = dict(latent_channels=64, hidden_size=128, depth=2, num_heads=4, mlp_ratio=4, context_dim=64,
                 lora_rank=8, lora_alpha=8.0, pooled_context=True, patch_size=1, abs_pe="sinusoidal",
                 context_slots=8, remat="none", dtype="float32")
    # The fixed mel codec at 16 kHz (64 bands): the real-clip evaluator recognises 0.91 of its reconstructions
    # of the test clips, 0.07 of a tiny Oobleck trained in the demo's budget (docs/notes/demo.md). The Oobleck
    # sizes serve `vae.kind=oobleck` (16 kHz, 320x down: 50 latent frames/s); set its latent_channels too.
    c.vae = dict(kind="mel", sample_rate_hz=16000, audio_channels=1, encoder_hidden_size=16, decoder_channels=16,
                 channel_multiples=(1, 2, 4, 8), downsampling_ratios=(2, 4, 5, 8), latent_channels=64,
                 dtype="float32")
    # Fewer sampling steps for the tiny DiT (20 did no better than 10); guidance 6 (held out 0.326 / 0.333 / 0.349
    # / 0.333 at 3 / 4.5 / 6 / 8, docs/notes/demo.md); the mel latents are ~unit std already (a tiny
    # Oobleck's are ~2.6: latent_scale 0.4 with it) and sigma centred higher, where the condition decides.
    c.flow = dict(num_steps=10, cfg_scale=6.0, sway_coef=-1.0, cond_drop_prob=0.2, latent_scale=1.0,
                  sigma_mean=1.0)
    # OpenSFX clips are short: 4-s speech and 2-s audio windows; batch 8 fits 2 cores.
    c.data.update(dict(path="data/opensfx", speech_duration_s=4.0, audio_duration_s=2.0, batch_size=8,
                       num_workers=0, text_max_tokens=8))  # text rows = dit.context_slots, so tta trains too
    c.train.update(dict(log_every_steps=10, checkpoint_every_steps=200))
    # `make demo` on 2 cores, quiet: stage 1 ~0.25 s/step, stage 2 (cached HuBERT frames) ~0.14 s/step.
    # OpenSFX clips are shorter than the windows: their zero padding is silence the model must make, and
    # the flow stages learn each clip's start, which the demo judges generation against.
    c.vae_stage.update(dict(lr=1e-3, steps=500, batch_size=8, stft_windows=(512, 256, 128, 64), crop_s=0.5,
                            mask_padding=False))
    c.tta.update(dict(warmup_steps=50, steps=1000, batch_size=8, text_dim=64, mask_padding=False,
                      random_crop=False))
    # HuBERT trains from scratch with the bridge; a constant 1e-3 for 18 epochs; the last epoch, not the best
    # of a 71-record valid split, feeds stage 2 (the best one gave a stage 2 that ignored its condition).
    c.stage1.update(dict(lr=1e-3, warmup_epochs=1, schedule="constant", max_epochs=18, batch_size=16,
                         patience_epochs=8, train_hubert=True, grad_clip=1.0, random_crop=False, keep_best=False))
    # 2500 steps at 3e-3 (~19 epochs of the demo corpus); stage 1's tokens kept as they are (training their
    # projection cut the DiT's use of them from 0.51 to 0.20 nearest-class-mean).
    # Token noise 0.25: the held-out voice's tokens sit off the training voices'. A cosine decay and an EMA of
    # the DiT: 0.307 held out against 0.253 at a constant rate without (docs/notes/demo.md).
    c.stage2.update(dict(lr=3e-3, warmup_steps=50, schedule="cosine", steps=2500, epochs=0, batch_size=8,
                         ema_decay=0.999, mask_padding=False, random_crop=False, train_projection=False,
                         token_noise=0.25))
    # As stage 2's data handling and schedule (cosine from 1e-3, EMA 0.999: held-out 1 / 2 / 4 steps 0.234 / 0.330 /
    # 0.375 on seed 0 against 0.123 / 0.218 / 0.211 at a constant lr without EMA, docs/notes/meanflow.md);
    # guidance at the tiny sampler's scale; 2000 steps (~16 epochs, ~6 min on 2 cores).
    c.meanflow.update(dict(lr=1e-3, warmup_steps=50, schedule="cosine", steps=2000, batch_size=8, ema_decay=0.999,
                           cfg_scale=c.flow.cfg_scale, mask_padding=False, random_crop=False))
  return c
