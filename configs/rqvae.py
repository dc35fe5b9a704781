"""Configuration of a whole rqvae-jax run: model, quantizer, loss, data, optimiser, logging.

Usage: `--config configs/rqvae.py` (the published configuration) or
`--config configs/rqvae.py:VARIANT` with VARIANT one of `paper`, `original`, `demo`,
`cpu_hour`, `smoke`, `codec` (skips off, for the codec and the prior: README, Codec and
prior), and the original's baselines `vqvae` (one codebook) and `vae` (a Gaussian latent):
the paper's model with its bottleneck swapped (`set_bottleneck`, README: Baselines).
Every constant of the model is a field here, including those where the paper and the original
code disagree (`paper` follows the paper, `original` follows the released code).
"""
import ml_collections

STEMS = ('bass', 'drums', 'guitar', 'piano')
VARIANTS = ('paper', 'original', 'demo', 'cpu_hour', 'smoke', 'codec', 'vqvae', 'vae')
VQVAE_CODEBOOK_SIZE = 8092               # the released VQ-VAE; its search space: 512, 1024


def set_bottleneck(c: ml_collections.ConfigDict, kind: str,
                   codebook_size: int = VQVAE_CODEBOOK_SIZE) -> ml_collections.ConfigDict:
  """`c` with its bottleneck swapped, everything else kept (in place; returns `c`).

  'vq': one codebook of `codebook_size` codes; its loss keeps the original VQ-VAE's
  0.75 * codebook + encoder terms (with one stage the RQ-VAE's cumulative term is the encoder
  term again, so it is set to 0). 'gaussian': the VAE's per-frame Gaussian with the KL term
  (`loss.kl_weight`, `loss.kl_form`). 'rvq': unchanged.
  """
  if kind == 'vq':
    c.model.quantizer.num_quantizers = 1
    c.model.quantizer.codebook_size = int(codebook_size)
    c.loss.cumulative_term = 0.0
  elif kind not in ('rvq', 'gaussian'):
    raise ValueError(f"bottleneck must be 'rvq', 'vq' or 'gaussian', got {kind!r}.")
  c.model.bottleneck = kind
  return c


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  variant = arg or 'paper'
  if variant not in VARIANTS:
    raise ValueError(f'Unknown config variant {variant!r}: choose one of {VARIANTS} '
                     '(e.g. --config configs/rqvae.py:smoke).')
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # ----- model (RQVAE(config.model)) -----
  m = c.model = ml_collections.ConfigDict()
  m.num_stems = len(STEMS)
  m.in_channels = 1
  m.channels = (16, 32, 64, 128, 256)      # output channels of encoder blocks 1..5
  m.kernels = (3, 7, 7, 6, 4)
  m.strides = (1, 5, 5, 4, 2)
  m.padding = 1
  m.prelu_init = 0.1
  m.dropout = 0.1
  m.lstm_layers = 2
  m.bn_momentum = 0.9                      # PyTorch momentum 0.1
  m.bn_epsilon = 1e-5
  m.skip_connections = True
  # Dense layers (the fc after each BiLSTM) initialised like PyTorch's nn.Linear, U(+-1/sqrt(
  # fan_in)) for weight and bias; False: Flax's lecun-normal weight and zero bias. A workdir
  # saved before the field existed trained with False (checkpoints.load_config).
  m.torch_init = True
  m.skip_mode = 'add'                      # 'add' (paper) or 'gated' by the decoder's state
  m.output_kernel = 0                      # output layer taps; 0 = the first encoder kernel
  # 'waveform': the paper's transposed-conv decoder; 'mask': per-stem softmax masks on the
  # mixture's STFT, one frame per latent frame (rqvae_jax/mask_head.py, README: Demo);
  # 'spectrum': each stem's STFT magnitude from the codes alone, phase by Griffin-Lim
  # (rqvae_jax/spectrum_head.py; codec mode, skips off).
  m.output_head = 'waveform'
  m.mask_fft = 800                         # mask/spectrum STFT size: an even multiple of the hop
  m.mask_hidden = 0                        # mask/spectrum head BiLSTM/dense width; 0 = channels[-1]
  m.griffin_lim_iters = 32                 # spectrum head: phase iterations without a mixture
  m.mask_bin_features = 0                  # per-bin mask network width; 0 = off (mask_head.py)
  m.mask_bin_layers = 0                    # residual (time x frequency) convs in it, dilated 1, 2, 4.. in frequency
  m.mask_bin_dilate_time = False           # and dilated 1, 2, 4.. in time too (same cost)
  # 'rvq': the paper's residual VQ; 'vq': one codebook (the VQ-VAE baseline, num_quantizers
  # 1); 'gaussian': a per-frame Gaussian latent (the VAE baseline). rqvae_jax/bottleneck.py.
  m.bottleneck = 'rvq'
  # Audio normalisation: model sees (stem - offset) / scale per stem. The original z-scores
  # int16-scale samples with mean 122.759 and std 2359.9309; on float audio in [-1, 1] that
  # is offset 122.759 / 32768 and scale 2359.9309 / 32768.
  m.norm_offset = 122.759 / 32768.0
  m.norm_scale = 2359.9309 / 32768.0
  m.dtype = 'float32'                      # compute dtype ('bfloat16' for mixed precision)
  # 'auto': cuDNN on a CUDA GPU, the compiled kernel on the CPU (float32, when a C++ compiler
  # builds it), else 'scan'; or 'scan' / 'native' / 'cudnn' (rqvae_jax/lstm.py, BiLSTM).
  m.lstm_impl = 'auto'
  # 'matmul' (matmul forms where they beat XLA's conv on the CPU), 'xla', or 'auto' (per
  # backend, blocks.AUTO_CONV_IMPL; benchmarks/gpu_check.py times both on a device).
  m.conv_impl = 'auto'

  # ----- residual vector quantizer (config.model.quantizer) -----
  q = m.quantizer = ml_collections.ConfigDict()
  q.num_quantizers = 12
  q.codebook_size = 4096
  q.usage_decay = 0.97                     # original code: 0.93
  q.dead_threshold = 2.0                   # original code: 1.0
  q.restart_every = 10                     # training steps between dead-code restarts
  q.kmeans_stages = 'first'                # 'first' (original), 'all', or 'none'
  q.kmeans_examples = 50                   # training mixtures encoded for k-means
  q.kmeans_iters = 20
  q.kmeans_seeding = 'kmeans++'            # or 'random'
  q.distance_dtype = 'float32'             # 'bfloat16' inputs with float32 accumulation
  # The training step's nearest-code search: 'auto' screens the codes with a bfloat16 dot
  # where the CPU kernels run and this CPU's bfloat16 dot is faster, then scores the
  # candidates exactly (the codes are the exact nearest either way; README: Performance);
  # 'screened' wherever the kernels run; 'float32' the plain float32 search.
  q.train_search = 'auto'
  q.codebook_ema_decay = 0.99              # EMA of codebook weights used for validation

  # ----- loss -----
  l = c.loss = ml_collections.ConfigDict()
  # Weight of the multi-scale mel loss in the total: the code's 1e-6 is the only published
  # value (the paper gives none; its "alpha = 1" is mel_log_weight below).
  l.mel_weight = 1e-6
  l.mel_log_weight = 1.0                   # paper alpha: log-mel L2 term inside the mel loss
  l.time_weight = 1.0
  l.commitment_weight = 1.0
  l.codebook_term = 0.75                   # weight of mse(sg(r), q) inside the commitment
  l.encoder_term = 1.0                     # weight of mse(r, sg(q))
  l.cumulative_term = 1.0                  # weight of mse(z_e, sg(sum of q so far))
  l.sisdr_weight = 0.0                     # optional -SI-SDR term (not in the paper)
  # Gaussian bottleneck only (losses.gaussian_kl): 'standard' = KL(q(z|x) || N(0, I)) summed
  # over the latent dims, averaged over frames; 'sqrt' = the original VAE's
  # sqrt(mean over the batch of the KL summed over frames and dims). The weight is our
  # choice, not tuned (the original: sqrt form, weight 1).
  l.kl_weight = 1e-3
  l.kl_form = 'standard'
  l.stft_weight = 0.0                      # optional multi-resolution STFT term (not in the paper)
  l.stft_window_powers = (8, 10)
  l.stft_log_floor = 1e-3
  l.mel_window_powers = (6, 7, 8, 9, 10, 11)
  l.mel_min_n_fft = 512
  l.num_mels = 64
  l.log_epsilon = 1e-5

  # ----- data -----
  d = c.data = ml_collections.ConfigDict()
  d.root = ''                              # prepared Slakh2100 folder; '' = synthetic default
  d.stems = STEMS
  d.sample_rate = 22050
  d.segment_samples = 88200               # 4 s training windows; a multiple of 200 here
  # Random shift in [-segment/2, segment/2) of each training window: our choice. The original
  # supports it (`aug_shift`) but never enables it (fixed 4 s grid); `original` turns it off.
  d.shift_augmentation = True
  # Remixing (rqvae_jax/augment.py, our choice, off in `paper`/`original`): this share of each
  # batch gets each stem from another example; every stem scaled by a gain from the range.
  d.remix_fraction = 0.0
  d.stem_gain_range = (1.0, 1.0)
  d.min_track_seconds = 12.0
  d.max_track_seconds = 640.0
  d.missing_stems = 'drop'                 # a track without a stem file: 'drop' it, or 'zeros' (MSDM)
  d.num_parallel_reads = 4
  d.prefetch_batches = 2
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.seed = 0
  d.synthetic.num_train = 200
  d.synthetic.num_validation = 20
  d.synthetic.num_test = 40
  d.synthetic.min_seconds = 20.0
  d.synthetic.max_seconds = 40.0
  d.synthetic.cache_dir = ''               # '' = ~/.cache/rqvae_jax/synthetic
  # Evaluation protocol (MSDM): 4 s windows, 2 s hop, keep windows with >= 2 active stems.
  d.eval_window_samples = 88200
  d.eval_hop_samples = 44100
  d.silence_threshold = 1.5e-5             # ||s||_2 / N on raw audio
  d.min_active_stems = 2

  # ----- optimiser and schedule -----
  o = c.optim = ml_collections.ConfigDict()
  o.optimizer = 'adam'
  o.lr = 1e-3
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.warmup_steps = 0
  o.decay = 'constant'                     # or 'cosine' (to final_lr_fraction at the last step)
  o.final_lr_fraction = 0.0
  o.grad_clip_norm = 0.0                   # 0 = off
  # Polyak average of the weights, validated and separated with (train_state.update_params_ema:
  # decay min(this, (1 + t) / (10 + t)) at step t); 0 = off (the original has none).
  o.param_ema_decay = 0.0
  o.plateau_factor = 0.5                   # lr *= factor when val SI-SDRi improved < min_delta
  o.plateau_min_delta = 0.05
  o.early_stop_patience = 0                # 0 = off (original: 3)

  # ----- separation (separate, eval) -----
  i = c.inference = ml_collections.ConfigDict()
  i.chunk_samples = 88200                  # model input length per chunk
  i.overlap = 0.5                          # fraction of a chunk shared with the next one
  i.batch_size = 8                         # chunks per device call
  i.in_flight = 2                          # device calls at once (2 keeps both CPU cores busy)
  # The residual VQ's code search: 'float32' (the training step's), 'screened' (a bfloat16
  # dot screened by a proven error bound, the few unresolved codes scored exactly: the same
  # nearest codes, ~10 % faster separation on the AVX-512-BF16 EPYC), 'auto' (screened where
  # this CPU's bfloat16 dot measures faster; quantizer.use_screened_search).
  i.vq_search = 'auto'
  i.use_ema_codebooks = True               # separate with the EMA codebooks (as validated)
  i.use_ema_params = True                  # and the weights' average, where the run kept one
  # Demucs' shift trick: average this many passes, the first as is, the others over the song
  # delayed by seeded random amounts up to 0.5 s (moving the chunk grid and, with the mask
  # head, the STFT frame grid). N times the work. Evaluation (track mode) and the separate
  # command (its --shifts) use it; validation during training separates once.
  i.shifts = 1

  e = c.eval = ml_collections.ConfigDict()
  e.mode = 'track'                         # 'track': separate whole tracks, score windows (MSDM)
  #                                          'window': separate each window alone (original)
  e.max_tracks = 0                         # 0 = all tracks of the split
  e.num_example_wavs = 2

  c.batch_size = 16                        # global batch
  c.num_train_steps = 60_000
  c.log_every_steps = 50
  c.eval_every_steps = 5_000
  # Validation windows: 0 = every protocol window of the validation split (the original's
  # whole split; the plateau rule's 0.05 dB needs it), N > 0 = N batches spread over it.
  c.num_eval_batches = 0
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3
  c.num_audio_examples = 2

  if variant == 'original':
    q.usage_decay = 0.93
    q.dead_threshold = 1.0
    d.shift_augmentation = False           # the released config trains on a fixed 4 s grid
    o.early_stop_patience = 3
  elif variant in ('demo', 'cpu_hour', 'codec'):
    # Trains in minutes on a 2-core CPU and separates the synthetic set measurably: a
    # narrower bottleneck, 4 x 256 codes, 2 s training windows (evaluation keeps the 4 s
    # protocol; separation runs 2 s chunks with overlap-add), the cheap losses plus the
    # optional SI-SDR term (the mel term is the costliest part of a step). 2 s x 6 beat
    # 1 s x 8 (600 steps) and 1.5 s x 6 in the same time (README: Demo).
    m.channels = (16, 32, 64, 128, 128)
    m.dropout = 0.0
    m.output_head = 'mask'                 # waveform decoder: +0.14 dB over all-zero in 500 steps
    o.lr = 2e-3
    o.decay = 'cosine'                     # to 0.1 x lr at the last step; no plateau halving
    o.final_lr_fraction = 0.1              # (16 validation windows are too noisy to drive it)
    o.plateau_factor = 1.0
    q.num_quantizers = 4
    q.codebook_size = 256
    q.kmeans_examples = 32
    l.mel_weight = 0.0
    l.sisdr_weight = 0.1
    d.segment_samples = 44000
    i.chunk_samples = 44000
    i.batch_size = 16
    c.batch_size = 6
    c.num_train_steps = 1400
    c.eval_every_steps = 250
    c.num_eval_batches = 3                 # 18 windows
    c.checkpoint_every_steps = 250
    c.log_every_steps = 20
    if variant == 'cpu_hour':
      # The demo's recipe, a wider head and remixing, for 1.5-2 hours of a 2-core CPU
      # (README: Demo), validated on 48 windows every 250 steps (workdir/val_sisdri.png).
      c.num_train_steps = 3000
      c.eval_every_steps = 250
      c.checkpoint_every_steps = 500
      c.num_eval_batches = 8
      # A wider decoder (256-unit BiLSTM) and the per-bin mask network (8 wide then; its
      # width is set below): each +0.33 dB over the demo's head at 500 steps, at 0.80x / 0.89x
      # its speed (README: Demo).
      m.mask_hidden = 256
      # Four residual (time x frequency) convs in the per-bin network, dilated 1, 2, 4, 8 in
      # frequency, with gradients clipped to norm 1 (without the clip a step-500 spike cost
      # 1.6 dB of validation): test 7.67 vs 7.41, piano above its all-zero figure, at 0.75x
      # the speed (README: Demo, An hour on the CPU).
      m.mask_bin_layers = 4
      o.grad_clip_norm = 1.0
      # Those convolutions dilated along time as well (+-16 frames, ~150 ms, at the same
      # cost), and validation and separation with the weights' Polyak average: test 7.90 vs
      # 7.67, validation 8.23 vs 7.83 at step 3000; the average alone is worth ~0.01 dB at
      # the end of the cosine schedule (7.90 with the raw weights), more early on.
      m.mask_bin_dilate_time = True
      o.param_ema_decay = 0.999
      # A 1600-point STFT for the mask (801 bins of 13.8 Hz, hop still 200) and the per-bin
      # network 12 wide: test 8.23 vs 7.90 (all-zero 5.05, so +3.18), validation 8.62 vs 8.23
      # at step 3000, at ~1.5x the time per step (README: An hour on the CPU). Each alone
      # gave 7.96 / 7.97. Workdirs saved before keep their own values (config.json has both).
      m.mask_fft = 1600
      m.mask_bin_features = 12
      # Half of each batch remixed across examples, stem gains 0.5-1.5 (rqvae_jax/augment.py):
      # with 200 training tracks the demo recipe's training SI-SDR ran ~2.5 dB above validation.
      d.remix_fraction = 0.5
      d.stem_gain_range = (0.5, 1.5)
    if variant == 'codec':
      # Codec mode (python -m rqvae_jax.codec, the RQ-Transformer prior): the demo's sizes,
      # no skips, so the codes are the whole representation and decode alone (the mask head
      # masks the mixture's STFT and cannot). The head predicts magnitudes (README: Codec and
      # prior): the paper's waveform decoder, trained so for 600 steps, output only a flat
      # broadband noise (SI-SDR -42 dB); `--config.model.output_head=waveform` keeps it.
      m.output_head = 'spectrum'
      m.skip_connections = False
      l.stft_weight = 1.0                  # magnitudes are what Griffin-Lim will be given
      c.num_train_steps = 600
      c.eval_every_steps = 200
      c.checkpoint_every_steps = 200
  elif variant == 'vqvae':
    set_bottleneck(c, 'vq')                # sizes 512 / 1024: --config.model.quantizer.codebook_size
  elif variant == 'vae':
    set_bottleneck(c, 'gaussian')
    m.dropout = 0.0                        # the released VAE's fixed hyper-parameters
  elif variant == 'smoke':
    m.channels = (4, 8, 8, 16, 16)
    q.num_quantizers = 3
    q.codebook_size = 32
    q.kmeans_examples = 4
    q.kmeans_iters = 3
    q.restart_every = 2
    l.mel_window_powers = (6, 9)           # one folded-FFT and one direct scale: fast compiles
    d.segment_samples = 10000
    i.chunk_samples = 10000
    i.batch_size = 2
    d.eval_window_samples = 10000
    d.eval_hop_samples = 5000
    d.synthetic.num_train = 4
    d.synthetic.num_validation = 2
    d.synthetic.num_test = 2
    d.synthetic.min_seconds = 2.0
    d.synthetic.max_seconds = 3.0
    c.batch_size = 2
    c.num_train_steps = 4
    c.eval_every_steps = 2
    c.num_eval_batches = 1
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
  return c
