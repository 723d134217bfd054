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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config override errors turned into one line.

  ml_collections raises a bare AttributeError/KeyError (with a traceback) for
  `--config.no.such.key=1`; say which flag and why instead.
  """
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
