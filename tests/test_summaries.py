"""The metric writer: clu's TensorBoard writer, or the log where clu cannot be imported."""
import logging
import os
import sys

import numpy as np

from rqvae_jax import summaries


def test_metric_writer_is_clus_where_clu_imports(tmp_path):
  writer = summaries.metric_writer(str(tmp_path))
  assert not isinstance(writer, summaries.ScalarLogWriter)
  writer.write_scalars(3, {'train/loss': 1.5})
  writer.flush()
  writer.close()
  assert any(p.name.startswith('events.out.tfevents') for p in tmp_path.iterdir())


def test_without_clu_scalars_go_to_the_log_and_a_json_lines_file(tmp_path, monkeypatch,
                                                                    caplog):
  """A GPU image without TensorFlow (which clu's writers import): training still runs, its
  scalars are logged and kept in workdir/scalars.jsonl, the rest is dropped, and the warning
  says what to install."""
  import json
  monkeypatch.setitem(sys.modules, 'clu', None)          # `from clu import ...` fails
  with caplog.at_level(logging.INFO):
    writer = summaries.metric_writer(str(tmp_path))
    assert isinstance(writer, summaries.ScalarLogWriter)
    writer.write_hparams({'lr': 1e-3})
    writer.write_scalars(7, {'train/loss': np.float32(0.25), 'val/sisdri_mean': 3.5})
    writer.write_scalars(8, {'train/loss': 0.125})
    writer.write_images(7, {'a': np.zeros((1, 4, 4, 3), np.uint8)})
    writer.write_audios(7, {'a': np.zeros((1, 10, 1), np.float32)}, sample_rate=22050)
    writer.flush()
    writer.close()
  text = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'No TensorBoard summaries' in text and 'pip install clu tensorflow-cpu' in text
  assert '[7] train/loss = 0.25, val/sisdri_mean = 3.5' in text
  assert os.listdir(tmp_path) == [summaries.SCALARS_FILE]
  rows = [json.loads(line) for line in (tmp_path / summaries.SCALARS_FILE).read_text().splitlines()]
  assert rows == [{'step': 7, 'train/loss': 0.25, 'val/sisdri_mean': 3.5},
                  {'step': 8, 'train/loss': 0.125}]
  # A process that only logs (not the main one of a multi-host run) writes no file.
  other = tmp_path / 'other'
  other.mkdir()
  summaries.metric_writer(str(other), just_logging=True).write_scalars(1, {'x': 1.0})
  assert os.listdir(other) == []
