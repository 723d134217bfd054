"""Device mesh, shardings and host <-> global array helpers (data parallelism).

One `Mesh` over every device of every host with a single `data` axis. Batches
are global `jax.Array`s sharded along their leading axis on `data`; parameters
and optimiser state are replicated. Each host feeds only its own slice of the
global batch (`host_batch_to_global`).
"""

from __future__ import annotations


import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices of all processes.

  Axis type Auto: the compiler propagates shardings from the inputs (the
  batch) through the model, so model code needs no sharding annotations.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def per_host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.device_count():
    raise ValueError(f"batch_size={global_batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  return global_batch_size // jax.process_count()


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's numpy slice into global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

