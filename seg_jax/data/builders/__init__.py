"""TFDS dataset builders for seg_jax.

`shapes`: the embedded, offline, procedural scene dataset (`seg_shapes`).
"""

from seg_jax.data.builders.shapes import CLASS_NAMES
from seg_jax.data.builders.shapes import NUM_CLASSES
from seg_jax.data.builders.shapes import OFFLINE_DOWNLOAD_CONFIG
from seg_jax.data.builders.shapes import SPLITS
from seg_jax.data.builders.shapes import SegShapes
from seg_jax.data.builders.shapes import ShapesConfig
from seg_jax.data.builders.shapes import example_rng
from seg_jax.data.builders.shapes import generate_scene
from seg_jax.data.builders.shapes import prepare
from seg_jax.data.builders.shapes import shapes_builder

__all__ = [
    'CLASS_NAMES',
    'NUM_CLASSES',
    'OFFLINE_DOWNLOAD_CONFIG',
    'SPLITS',
    'SegShapes',
    'ShapesConfig',
    'example_rng',
    'generate_scene',
    'prepare',
    'shapes_builder',
]
