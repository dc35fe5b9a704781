"""Datasets for rqvae-jax.

* `data.slakh`: the prepared Slakh2100 layout: `scan` (validation) and windowed reads.
* `data.prepare`: one-time conversion of other data (rates, channels, FLAC, original layout).
* `data.synthetic`: the synthetic mini-Slakh default (no download), cached once.
* `data.pipeline`: `resolve_root`, `load_tracks` and the deterministic tf.data training stream.
* `data.windows`: the evaluation windows of the MSDM protocol.
* `data.tfds`: TFDS builders `slakh2100` (manual) and `synthetic_slakh` of those windows.
"""
