"""The separate command: `rqvae-separate` (installed) or `python -m rqvae_jax.separate`.

Its options follow Demucs', so that `demucs -o OUT song.mp3` users find theirs: stems go to
OUT/<model>/<song>/<stem>.wav as 16-bit PCM WAV by default, <model> being the name of the
--workdir folder (Demucs: the model's name), and --filename, --int24, --float32, --flac,
--clip-mode, --two-stems, --segment, --overlap, --shifts, -d and -j mean what they mean
there (README: Separating your own songs has the table). Flags are spelled with dashes; the
underscore spelling (--batch_size) is accepted too, as in every rqvae-jax command.

The command goes on past a bad file (one line of error) and exits non-zero at the end with
a summary; errors are one clear line, with the traceback under --verbose.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from rqvae_jax import cli
from rqvae_jax import hugepages
from rqvae_jax import stem_files

INPUTS = ('Input formats: whatever libsndfile decodes: WAV (also RF64, W64, streaming headers), '
          'FLAC, OGG/Vorbis, Opus, MP3, AIFF, CAF, AU. AAC/M4A/ALAC/WMA need ffmpeg first, '
          'e.g. `ffmpeg -i song.m4a song.flac`.')
DEVICES = {'cpu': 'cpu', 'gpu': 'cuda'}     # -d -> JAX_PLATFORMS


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='rqvae-separate',
      description='Separates songs into stems with a trained rqvae-jax workdir. Stems go to '
      'OUT/<model>/<song>/<stem>.wav (16-bit WAV at the input\'s rate, length and channels); '
      '<model> is the --workdir folder\'s name. ' + INPUTS,
      epilog='Flags are spelled with dashes; --batch_size etc. work too. -d cpu|gpu is '
      'JAX_PLATFORMS=cpu|cuda; without -d JAX picks the best device present.')
  p.add_argument('files', nargs='+', metavar='FILE', help='audio files to separate')
  p.add_argument('--workdir', required=True,
                 help='a training workdir (config.json and checkpoints): the model')
  p.add_argument('-o', '--out', default='separated', help='output folder (default: separated)')
  p.add_argument('--filename', default=stem_files.DEFAULT_FILENAME,
                 help='where each stem goes under OUT/<model>/, a template of {track}, '
                 '{trackext}, {stem} and {ext} (default: %(default)s)')
  p.add_argument('--checkpoint', default='best', help="'best' (default), 'latest' or a step")
  bits = p.add_mutually_exclusive_group()
  bits.add_argument('--int24', action='store_true', help='24-bit PCM instead of 16-bit')
  bits.add_argument('--float32', action='store_true', help='32-bit float instead of 16-bit')
  p.add_argument('--flac', action='store_true', help='FLAC files instead of WAV (16 or 24-bit)')
  p.add_argument('--clip-mode', default='rescale', choices=stem_files.CLIP_MODES,
                 help='a stem beyond full scale: rescale it as a whole (default), clamp its '
                 'samples, or none (--float32 only)')
  p.add_argument('--two-stems', metavar='STEM',
                 help='write STEM and no_STEM (the sum of the other stems) only')
  p.add_argument('--segment', type=float, metavar='SECONDS',
                 help='chunk length in seconds (default: the config\'s inference.chunk_samples, '
                 'rounded up to a length the model maps back to itself)')
  p.add_argument('--overlap', type=float,
                 help='overlap of consecutive chunks, in [0, 1) (default: the config\'s, 0.5)')
  p.add_argument('--shifts', type=int,
                 help='average N passes over chunk grids shifted by up to 0.5 s (N times '
                 'slower; seeded, so repeatable; default: the config\'s inference.shifts)')
  p.add_argument('-j', '--batch-size', type=int, default=0,
                 help='chunks per device call (default: the config\'s)')
  p.add_argument('--in-flight', type=int, default=0,
                 help='device calls at once (default: the config\'s, 2)')
  p.add_argument('-d', '--device', choices=sorted(DEVICES),
                 help='cpu or gpu (= JAX_PLATFORMS=cpu|cuda; default: what JAX finds)')
  p.add_argument('-v', '--verbose', action='store_true',
                 help='print tracebacks with errors (for bug reports)')
  return p


def output_format(args: argparse.Namespace) -> stem_files.OutputFormat:
  return stem_files.OutputFormat(
      subtype='PCM_24' if args.int24 else 'FLOAT' if args.float32 else 'PCM_16',
      container='FLAC' if args.flac else 'WAV', clip_mode=args.clip_mode,
      filename=args.filename, two_stems=args.two_stems)


def model_name(workdir: str) -> str:
  """The model's folder in the output: the workdir's own name (runs/demo/ -> 'demo')."""
  return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


def use_device(device: Optional[str]) -> None:
  """Points JAX at -d's platform before anything touches a device.

  Raises:
    ValueError: the platform is not there (e.g. -d gpu without a CUDA jaxlib), with the fix.
  """
  if not device:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', DEVICES[device])
  try:
    jax.devices()
  except Exception as e:  # pylint: disable=broad-except
    # JAX raises RuntimeError for a platform it cannot start, and an AssertionError when
    # no plugin of that name is installed at all.
    reason = f' ({cli.one_line(e)})' if str(e).strip() else ' (no such JAX plugin installed)'
    hint = (" Install JAX's CUDA wheels (pip install 'rqvae-jax[cuda]' on a CUDA 12 machine) "
            'or use -d cpu.' if device == 'gpu' else '')
    raise ValueError(f'-d {device}: JAX cannot use {DEVICES[device]}{reason}.{hint}') from e


def _targets(named: List[Tuple[str, str]], fmt: stem_files.OutputFormat, stems: Sequence[str]
             ) -> Tuple[List[Tuple[str, str]], Dict[str, str]]:
  """Drops inputs whose stem files would be another input's (a --filename without {track})."""
  owner, kept, errors = {}, [], {}
  for path, name in named:
    ext = os.path.splitext(path)[1].lstrip('.')
    paths = fmt.relative_paths(name, ext, stems)
    clash = next((owner[q] for q in paths if q in owner), None)
    if clash:
      errors[path] = (f'would write the same files as {clash} (--filename {fmt.filename!r}): '
                      'put {track} in --filename, or separate it with another -o')
      continue
    owner.update({q: path for q in paths})
    kept.append((path, name))
  return kept, errors


def separate_files(files: Sequence[str], workdir: str, out: str, checkpoint='best',
                   overlap: Optional[float] = None, batch_size: int = 0, in_flight: int = 0,
                   show_progress: bool = True, stream=None,
                   fmt: Optional[stem_files.OutputFormat] = None,
                   shifts: Optional[int] = None,
                   segment: Optional[float] = None) -> int:
  """The command: checks the options, the output folder and the inputs, restores the model
  once, separates every good file into out/<model>/, and returns the exit code (1 when any
  file failed). `fmt` defaults to the command's default (16-bit WAV, rescale).

  A bad file costs one line of error and does not stop the others; the summary at the end
  lists what failed. Errors that concern every file (a missing workdir, an unwritable
  output folder, impossible options) raise: run_guarded prints them.
  """
  from rqvae_jax import audio as audio_lib  # pylint: disable=g-import-not-at-top
  stream = stream or sys.stderr
  fmt = fmt or stem_files.OutputFormat()
  if not files:
    raise ValueError('Give at least one audio file: rqvae-separate --workdir DIR song.wav '
                     '[more files] [-o separated]')
  fmt.check()
  if shifts is not None and shifts < 1:
    raise ValueError(f'--shifts must be at least 1, got {shifts}.')
  if segment is not None and not segment > 0:
    raise ValueError(f'--segment must be a positive number of seconds, got {segment}.')
  out = os.path.join(cli.check_output_dir(out), model_name(workdir))   # before minutes of work
  named, failed = cli.output_names(files)
  for path in list(p for p, _ in named):
    try:
      audio_lib.check_path(path)
    except ValueError as e:
      failed[path] = cli.one_line(e)
  named = [(p, n) for p, n in named if p not in failed]
  for path, message in failed.items():
    print(f'error: {path}: {message}', file=stream)
  done = []
  if named:
    from rqvae_jax import checkpoints, compilation_cache, separate  # pylint: disable=g-import-not-at-top
    stems = list(checkpoints.load_config(workdir).data.stems)
    fmt.check(stems)                                    # before the model is restored
    compilation_cache.enable()
    separator = separate.Separator.from_workdir(workdir, checkpoint)
    named, clashes = _targets(named, fmt, stems)
    for path, message in clashes.items():
      failed[path] = message
      print(f'error: {path}: {message}', file=stream)
    _configure(separator, overlap, batch_size, in_flight, segment)
    print(f'Restored {workdir} at step {separator.step}; stems go to {out}.', file=stream)
    for path, name in named:
      try:
        r = separate.separate_file(separator, path, out, stems, show_progress,
                                   folder_name=name, fmt=fmt, shifts=shifts)
      except ValueError as e:
        failed[path] = cli.one_line(e)
        print(f'error: {path}: {failed[path]}', file=stream)
        continue
      done.append(path)
      head = (f"{r['folder']}: {len(r['files'])} stems, {r['frames']} frames at "
              f"{r['sample_rate']} Hz x {r['channels']} ch")
      notes = stem_files.describe(r['encoded'], fmt)
      if r['silent']:
        print(f'{head}; the input is silent (peak {r["peak"]:.2g}), so are the stems{notes}')
      else:
        print(f"{head}; stems sum to the input within {r['residual_db']:.1f} dB "
              f'(residual / input energy){notes}')
  if failed:
    print(f'Separated {len(done)} of {len(done) + len(failed)} files into {out}; '
          f'{len(failed)} failed:', file=stream)
    for path, message in failed.items():
      print(f'  {path}: {message}', file=stream)
    return 1
  return 0


def _configure(separator, overlap, batch_size, in_flight, segment) -> None:
  """Applies the command's overrides of `config.inference` (checked here, before any file)."""
  from rqvae_jax import chunking, model  # pylint: disable=g-import-not-at-top
  inf = separator.config.inference
  if overlap is not None:
    inf.overlap = overlap
  if batch_size:
    if batch_size < 1:
      raise ValueError(f'--batch-size must be at least 1, got {batch_size}.')
    inf.batch_size = batch_size
  if in_flight:
    if in_flight < 1:
      raise ValueError(f'--in-flight must be at least 1, got {in_flight}.')
    inf.in_flight = in_flight
  if segment is not None:
    rate = int(separator.config.data.sample_rate)
    separator.chunk = model.next_valid_length(max(1, int(round(segment * rate))),
                                              separator.config.model)
    inf.chunk_samples = separator.chunk
  chunking.hop_of(separator.chunk, inf.overlap)        # a bad --overlap fails here


def main(argv: Optional[Sequence[str]] = None) -> int:
  """rqvae-separate / python -m rqvae_jax.separate; returns the exit status."""
  if argv is None:
    hugepages.reexec_if_useful()
  args = build_parser().parse_intermixed_args(
      cli.argparse_argv(sys.argv[1:] if argv is None else argv))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not args.verbose:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)   # Orbax logs every restore step at INFO

  def run():
    use_device(args.device)
    return separate_files(args.files, args.workdir, args.out, args.checkpoint, args.overlap,
                          args.batch_size, args.in_flight, fmt=output_format(args),
                          shifts=args.shifts, segment=args.segment)

  return cli.run_guarded(run, args.verbose)


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == '__main__':
  run()
