"""Configuration of an RQ-Transformer prior run over a trained codec's codes.

Usage: `python train_prior.py --config configs/prior.py[:VARIANT] --workdir DIR
--config.autoencoder_workdir=CODEC_DIR`, VARIANT one of `paper` (the paper's sizes: d 256,
8 heads, 24 spatial + 4 depth layers, dropout 0.1, Adam 1e-4, batch 16, weight EMA 0.999),
`cpu` (minutes on a 2-core CPU, for the codec variant's 4 x 256 codes) and `smoke` (tests).
The data (tracks, splits, rate) are the codec's: its saved config's `data` section.
"""
import ml_collections

VARIANTS = ('paper', 'cpu', 'smoke')


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  variant = arg or 'paper'
  if variant not in VARIANTS:
    raise ValueError(f'Unknown prior config variant {variant!r}: choose one of {VARIANTS} '
                     '(e.g. --config configs/prior.py:cpu).')
  c = ml_collections.ConfigDict()
  c.variant = f'prior:{variant}'           # not an RQ-VAE variant name (checkpoints.load_config)
  c.seed = 0
  c.autoencoder_workdir = ''               # the trained codec-mode RQ-VAE (required)
  c.autoencoder_checkpoint = 'best'

  t = c.transformer = ml_collections.ConfigDict()
  t.d_model = 256
  t.num_heads = 8
  t.spatial_layers = 24
  t.depth_layers = 4
  t.mlp_ratio = 4
  t.dropout = 0.1
  t.context_frames = 441                   # training window and sampling context (4 s)
  t.embed_init = 'codebooks'               # code embeddings start as the codec's codebooks

  o = c.optim = ml_collections.ConfigDict()
  o.optimizer = 'adam'
  o.lr = 1e-4
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.warmup_steps = 0
  o.decay = 'constant'
  o.final_lr_fraction = 0.0
  o.grad_clip_norm = 0.0
  c.ema_decay = 0.999                      # EMA of the weights: validated, tested, sampled

  s = c.sampling = ml_collections.ConfigDict()
  s.temperature = 1.0
  s.top_p = 0.9                            # the paper's

  c.batch_size = 16
  c.num_train_steps = 100_000
  c.log_every_steps = 50
  c.eval_every_steps = 2_000
  c.num_eval_windows = 64                  # validation windows (context_frames each)
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3

  if variant == 'cpu':
    t.d_model = 128
    t.num_heads = 4
    t.spatial_layers = 4
    t.depth_layers = 2
    t.context_frames = 220                 # 2 s of the codec's 110.25 frames/s
    o.lr = 1e-3
    o.warmup_steps = 100
    o.decay = 'cosine'
    o.final_lr_fraction = 0.05
    o.grad_clip_norm = 1.0
    c.ema_decay = 0.99                     # a short run: 0.999 would average the first steps
    c.num_train_steps = 1500
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.num_eval_windows = 32
    c.checkpoint_every_steps = 500
  elif variant == 'smoke':
    t.d_model = 32
    t.num_heads = 2
    t.spatial_layers = 2
    t.depth_layers = 2
    t.dropout = 0.0
    t.context_frames = 16
    o.lr = 3e-3
    c.ema_decay = 0.9
    c.batch_size = 4
    c.num_train_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 2
    c.num_eval_windows = 4
    c.checkpoint_every_steps = 2
  return c
