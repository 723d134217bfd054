"""What main.py and `python -m seg_jax.sweep` share on the command line: one-line errors.

User errors (unknown config key, bad value, bad data) end with `error: ...` on
stderr and a non-zero exit status, not a traceback.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from absl import flags

from seg_jax import registry


def fail(message: str, code: int = 2) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def unknown_override_message(override: str, error: Exception) -> str:
  """The one line for `--config.a.b=...` naming a key the loaded config does not have: whose
  key it is if another model's or dataset's, else ml_collections' closest key."""
  section, _, leaf = override[len("--config."):].partition(".")
  owners = {"model": registry.models_with_key,
            "dataset": registry.datasets_with_key}.get(section, lambda _: [])(leaf)
  if owners:
    return (f"{override}: not a key of this config's {section}; it is a key of "
            f"{', '.join(owners)} (choose the {section} when loading the config: "
            f"--config=FILE:{section}={owners[0]})")
  hint = re.search(r'Did you mean "(\w+)"', str(error).replace("\\", ""))
  return f"{override}: unknown config key" + (f" (did you mean {hint.group(1)}?)" if hint else "")


COMPONENT_OVERRIDES = ("--config.dataset.name=", "--config.model.name=")


def choose_components_when_loading(argv: list[str]) -> list[str]:
  """argv with `--config.dataset.name=X` / `--config.model.name=Y` moved into the config file's
  argument (`--config=FILE:ARG,dataset=X,model=Y`), so that the config is built with that
  dataset's (model's) own keys and the overrides after it can set them, e.g.
  `--config=configs/mask_rcnn.py --config.dataset.name=coco_json --config.dataset.train_json=F`.
  Without --config (a workdir's config) argv is unchanged."""
  chosen = [a for a in argv[1:] if a.startswith(COMPONENT_OVERRIDES)]
  position = next((i for i, a in enumerate(argv) if i and (a.startswith("--config=")
                                                           or a == "--config")), None)
  if not chosen or position is None:
    return argv
  rest = [a for a in argv if a not in chosen]
  position = rest.index(argv[position])
  if rest[position] == "--config":  # --config FILE
    if position + 1 >= len(rest):
      return argv
    del rest[position]
    value = rest[position]
  else:
    value = rest[position][len("--config="):]
  path, colon, arg = value.partition(":")
  options = [o for o in arg.split(",") if o] if colon else []
  for override in chosen:
    key, _, name = override[len("--config."):].partition("=")
    section = key.split(".")[0]
    options = [o for o in options if not o.startswith(f"{section}=")] + [f"{section}={name}"]
  rest[position] = f"--config={path}:{','.join(options)}"
  return rest


def parse_flags(argv: list[str], *, choose_components: bool = True) -> list[str]:
  """absl's parser, with config override errors turned into one line.

  ml_collections raises a bare AttributeError/KeyError (with a traceback) for
  `--config.no.such.key=1`; say which flag and why instead. `--config.dataset.name` and
  `--config.model.name` choose the component when the config is loaded
  (`choose_components_when_loading`).
  """
  if choose_components:
    argv = choose_components_when_loading(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError) as e:
    override = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                     and a.split("=")[0].rsplit(".", 1)[-1] in str(e)), "--config.?")
    fail(unknown_override_message(override, e))
  except (TypeError, ValueError) as e:
    fail(f"bad config override: {e}")


def distributed_options(distributed: bool, coordinator_address: str | None,
                        num_processes: int | None, process_id: int | None) -> dict | None:
  """main.py's multi-host flags -> the keyword arguments of jax.distributed.initialize, or None
  for a single-process run. Any of the three values implies --distributed (a lone --process_id
  is never ignored). Bad values and combinations stop with one line (`fail`); whatever JAX
  must find itself (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS) is left to it."""
  if not (distributed or coordinator_address or num_processes is not None
          or process_id is not None):
    return None
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      fail(f"--coordinator_address={coordinator_address}: must be HOST:PORT (the address of "
           "process 0), e.g. 10.0.0.1:12345")
  if num_processes is not None and num_processes < 1:
    fail(f"--num_processes={num_processes}: must be at least 1")
  if process_id is not None:
    if process_id < 0:
      fail(f"--process_id={process_id}: must be at least 0")
    if num_processes is not None and process_id >= num_processes:
      fail(f"--process_id={process_id}: must be below --num_processes={num_processes}")
  if coordinator_address and (num_processes is None) != (process_id is None):
    fail("--coordinator_address needs both --num_processes and --process_id (or neither, where "
         "the cluster provides them)")
  return {"coordinator_address": coordinator_address, "num_processes": num_processes,
          "process_id": process_id}
