"""Segmentation models (flax linen) and their registry."""

import jax


def init_key(seed: int) -> jax.Array:
  """PRNG key for parameter initialisation.

  The 'rbg' generator compiles about 4x faster than threefry on CPU (a tiny
  U-Net's jitted init: 3.8 s vs 13.8 s on 2 cores), and parameters are
  initialised once, replicated, so threefry's sharding-invariance is not
  needed here. Dropout keys stay threefry (identical for any device count).
  """
  return jax.random.key(seed, impl="rbg")
