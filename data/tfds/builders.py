"""TFDS builders whose examples are the evaluation windows of the MSDM protocol.

* `slakh2100`: manual download. Prepare the data once (`python -m data.prepare SRC DST`),
  then build with `manual_dir=DST`.
* `synthetic_slakh`: generated, no download: the synthetic mini-Slakh of
  `data.synthetic` (written once to its WAV cache, then windowed).

Splits `validation` and `test` hold the kept windows of `data.windows.eval_windows`
(4 s windows, 2 s hop, at least two non-silent stems); the counts of kept and skipped
windows are in `builder.info.metadata[split]`. Example features: `stems` float32
(window, num_stems) in config stem order, `track_id` (the track folder name), `start`
(sample offset in the track), `active` (per-stem non-silence). A `train` split (disjoint
windows of the training tracks, unfiltered) is written only with `include_train=True`.

Why training reads WAV windows (data.pipeline) and not these records. Measured with
`python -m benchmarks.data_throughput --batch 16 --batches 20 --compare-tfds` on the
2-core CPU machine (shared, load average ~3.5, page cache warm, 8 synthetic tracks):

    WAV windows via tf.data + soundfile seek:   351 examples/s, 2.9 ms CPU per example
    TFDS records (disjoint windows, shuffled): 1411 examples/s, 0.7 ms CPU per example

Records are ~4x faster, but the WAV stream already delivers ~90x what a training step
consumes (16 examples per ~4 s step) for ~1% of the step's CPU, while records would
(a) fix the window grid, losing the random-offset shift augmentation, (b) store float32,
4x the PCM_16 WAVs (1.4 MB per 4 s window: ~1.2 GB for the synthetic validation+test
windows, over 100 GB for the Slakh2100 train split), (c) need a rebuild whenever the
window length changes. So TFDS serves the versioned, inspectable evaluation windows and
training reads WAVs.
"""
import dataclasses
import hashlib
import inspect
import json
import os
from typing import Optional, Tuple

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from .. import slakh
from .. import synthetic
from .. import windows as windows_lib

_STEMS = ('bass', 'drums', 'guitar', 'piano')
_NAME_FIELDS = ('sample_rate', 'stems', 'window_samples', 'hop_samples', 'silence_threshold',
                'min_active_stems', 'min_track_seconds', 'max_track_seconds', 'missing_stems',
                'include_train',
                'synthetic_seed', 'num_train', 'num_validation', 'num_test', 'min_seconds',
                'max_seconds')


@dataclasses.dataclass(eq=False)
class WindowsConfig(tfds.core.BuilderConfig):
  """The settings the windows depend on; the defaults are the published protocol."""
  sample_rate: int = 22050
  stems: Tuple[str, ...] = _STEMS
  window_samples: int = 88200
  hop_samples: int = 44100
  silence_threshold: float = 1.5e-5
  min_active_stems: int = 2
  min_track_seconds: float = 12.0
  max_track_seconds: float = 640.0
  missing_stems: str = 'drop'  # or 'zeros' (see data.slakh.scan)
  include_train: bool = False
  # The synthetic set only.
  synthetic_seed: int = 0
  num_train: int = 200
  num_validation: int = 20
  num_test: int = 40
  min_seconds: float = 20.0
  max_seconds: float = 40.0

  def settings(self) -> dict:
    return {f: (list(getattr(self, f)) if f == 'stems' else getattr(self, f))
            for f in _NAME_FIELDS}

  def data_config(self, cache_dir: str = '') -> ml_collections.ConfigDict:
    """The `data` config section equivalent to these settings."""
    d = ml_collections.ConfigDict()
    d.root = ''
    d.stems = tuple(self.stems)
    d.sample_rate = self.sample_rate
    d.min_track_seconds = self.min_track_seconds
    d.max_track_seconds = self.max_track_seconds
    d.missing_stems = self.missing_stems
    d.eval_window_samples = self.window_samples
    d.eval_hop_samples = self.hop_samples
    d.silence_threshold = self.silence_threshold
    d.min_active_stems = self.min_active_stems
    d.synthetic = ml_collections.ConfigDict(dict(
        seed=self.synthetic_seed, num_train=self.num_train,
        num_validation=self.num_validation, num_test=self.num_test,
        min_seconds=self.min_seconds, max_seconds=self.max_seconds,
        cache_dir=cache_dir))
    return d


_DEFAULT = WindowsConfig(name='default', version='1.0.0',
                         description='The published protocol: 4 s windows, 2 s hop.')


def _config_name(settings: dict) -> str:
  if settings == _DEFAULT.settings():
    return 'default'
  blob = json.dumps(settings, sort_keys=True).encode()
  return 'custom_' + hashlib.sha1(blob).hexdigest()[:10]


def windows_config(data_config, include_train: bool = False,
                   synthetic_set: bool = True) -> WindowsConfig:
  """The builder config for a config's `data` section (named by a hash of its settings).

  With synthetic_set=False (real data) the synthetic settings are left at their defaults,
  so that they do not change the name.
  """
  syn = data_config.synthetic if synthetic_set else _DEFAULT.data_config().synthetic
  cfg = WindowsConfig(
      name='pending', version='1.0.0', sample_rate=int(data_config.sample_rate),
      stems=tuple(data_config.stems), window_samples=int(data_config.eval_window_samples),
      hop_samples=int(data_config.eval_hop_samples),
      silence_threshold=float(data_config.silence_threshold),
      min_active_stems=int(data_config.min_active_stems),
      min_track_seconds=float(data_config.min_track_seconds),
      max_track_seconds=float(data_config.max_track_seconds),
      missing_stems=str(data_config.get('missing_stems', 'drop')), include_train=include_train,
      synthetic_seed=int(syn.seed), num_train=int(syn.num_train),
      num_validation=int(syn.num_validation), num_test=int(syn.num_test),
      min_seconds=float(syn.min_seconds), max_seconds=float(syn.max_seconds))
  name = _config_name(cfg.settings())
  if name == 'default':
    return _DEFAULT
  cfg.name = name
  return cfg


class _WindowsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by both builders: windows of a prepared-layout root."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Evaluation windows of the MSDM protocol.'}
  BUILDER_CONFIGS = [_DEFAULT]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=no-self-argument
    # TFDS 4.9.10 resolves this through `importlib_resources`, a package it only declares
    # for Python < 3.9; the plain file path is what it needs.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'stems': tfds.features.Tensor(shape=(cfg.window_samples, len(cfg.stems)),
                                          dtype=np.float32,
                                          encoding=tfds.features.Encoding.BYTES),
            'track_id': tfds.features.Text(),
            'start': np.int64,
            'active': tfds.features.Tensor(shape=(len(cfg.stems),), dtype=np.bool_),
        }),
        homepage='https://github.com/gladia-research-group/multi-source-diffusion-models',
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # examples stay in track, then time order
    )

  def _root(self, dl_manager) -> str:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    data_config = cfg.data_config()
    root = self._root(dl_manager)
    splits = {}
    for split in ('validation', 'test') + (('train',) if cfg.include_train else ()):
      tracks = slakh.scan(root, split, data_config, verbose=False).kept
      if split == 'train':
        wins = _disjoint_windows(tracks, data_config)
      else:
        wins = windows_lib.eval_windows(tracks, data_config)
      self.info.metadata[split] = dict(tracks=len(tracks), kept=wins.num_kept,
                                       skipped=wins.num_skipped, root=root)
      splits[split] = self._generate_examples(tracks, wins, data_config)
    return splits

  def _generate_examples(self, tracks, wins, data_config):
    stems = tuple(data_config.stems)
    size = wins.window_samples
    current, audio = -1, None
    for (t, start), active in zip(wins.windows, wins.active):
      if t != current:
        current, audio = t, slakh.load_track(tracks[t], stems)
      x = audio[start:start + size]
      if x.shape[0] < size:
        x = np.pad(x, ((0, size - x.shape[0]), (0, 0)))
      yield f'{tracks[t].name}-{start:010d}', dict(
          stems=x, track_id=tracks[t].name, start=start, active=active)


def _disjoint_windows(tracks, data_config) -> windows_lib.EvalWindows:
  """Every non-overlapping window of every track (no silence filter, as in training)."""
  size = int(data_config.eval_window_samples)
  items, actives = [], []
  for i, track in enumerate(tracks):
    audio = slakh.load_track(track, tuple(data_config.stems))
    starts, active = windows_lib.window_activity(audio, size, size,
                                                 float(data_config.silence_threshold))
    if starts.size == 0:
      starts, active = np.zeros(1, np.int64), np.zeros((1, audio.shape[1]), bool)
    items += [(i, int(s)) for s in starts]
    actives.append(active)
  return windows_lib.EvalWindows(windows=items, active=np.concatenate(actives),
                                 num_kept=len(items), num_skipped=0, window_samples=size)


class Slakh2100(_WindowsBuilder):
  """Slakh2100 (prepared layout, manual download): evaluation windows."""

  _DESCRIPTION = ('Slakh2100 stems bass/drums/guitar/piano at 22 050 Hz, as prepared by '
                  'the multi-source diffusion models repository; windows of the MSDM '
                  'evaluation protocol.')
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download Slakh2100 (https://zenodo.org/records/4599666, or the 22 kHz four-stem version
  the multi-source diffusion models repository links), convert it once with
      python -m data.prepare SRC DST
  so that DST/{train,validation,test}/TrackNNNNN/{bass,drums,guitar,piano}.wav exist, and
  pass DST as `manual_dir` (tfds.download.DownloadConfig(manual_dir=DST)).
  """

  def _root(self, dl_manager) -> str:
    root = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(os.path.join(root, 'test')):
      raise ValueError(f'manual_dir {root} has no test split. Expected '
                       f'{slakh.expected_layout(self.builder_config.data_config())}.')
    return root


class SyntheticSlakh(_WindowsBuilder):
  """The synthetic mini-Slakh (generated from a seed): evaluation windows.

  `cache_dir` is where the synthetic WAVs are generated once (data.synthetic.cache_dir;
  default ~/.cache/rqvae_jax/synthetic). It does not change the content.
  """

  _DESCRIPTION = ('Synthetic four-stem music (bass, drums, guitar, piano) generated from a '
                  'seed by data.synthetic; windows of the MSDM evaluation protocol.')

  def __init__(self, *, cache_dir: str = '', **kwargs):
    self._cache_dir = cache_dir
    super().__init__(**kwargs)

  def _root(self, dl_manager) -> str:
    del dl_manager
    return synthetic.ensure_synthetic(self.builder_config.data_config(self._cache_dir))


def eval_builder(data_config, data_dir: Optional[str] = None,
                 include_train: bool = False) -> tfds.core.DatasetBuilder:
  """The prepared builder for a config: `slakh2100` if data.root is set, else synthetic."""
  root = data_config.get('root', '') or ''
  cfg = windows_config(data_config, include_train=include_train, synthetic_set=not root)
  if root:
    root = os.path.abspath(os.path.expanduser(root))
    builder = Slakh2100(config=cfg, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root))
    built_from = builder.info.metadata.get('test', {}).get('root')
    if built_from != root:
      raise ValueError(f'{builder.data_dir} was built from {built_from}, not {root}: pass '
                       'another data_dir or delete that folder to rebuild.')
  else:
    builder = SyntheticSlakh(config=cfg, data_dir=data_dir,
                             cache_dir=data_config.synthetic.get('cache_dir', '') or '')
    builder.download_and_prepare()
  return builder


def eval_dataset(data_config, split: str, data_dir: Optional[str] = None):
  """tf.data.Dataset of the evaluation windows of `split` (built on first use)."""
  builder = eval_builder(data_config, data_dir=data_dir)
  return builder.as_dataset(split=split, shuffle_files=False)
