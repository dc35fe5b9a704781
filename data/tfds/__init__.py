"""TFDS builders of the evaluation windows: `slakh2100` (manual) and `synthetic_slakh`.

Importing this package registers both, after which `tfds.builder('synthetic_slakh')`,
`tfds.load('slakh2100', download_and_prepare_kwargs=...)` etc. work. `eval_builder` and
`eval_dataset` pick the right one from a config's `data` section.
"""
from data.tfds.builders import eval_builder
from data.tfds.builders import eval_dataset
from data.tfds.builders import Slakh2100
from data.tfds.builders import SyntheticSlakh
from data.tfds.builders import WindowsConfig
from data.tfds.builders import windows_config
