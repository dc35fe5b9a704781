"""TFDS builders of the evaluation windows: `slakh2100` (manual) and `synthetic_slakh`.

Importing this package registers both, after which `tfds.builder('synthetic_slakh')`,
`tfds.load('slakh2100', download_and_prepare_kwargs=...)` etc. work. `eval_builder` and
`eval_dataset` pick the right one from a config's `data` section.
"""
from .builders import eval_builder
from .builders import eval_dataset
from .builders import Slakh2100
from .builders import SyntheticSlakh
from .builders import WindowsConfig
from .builders import windows_config
