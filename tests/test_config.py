"""Config errors fail at start with one line naming the key."""

import glob
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

from seg_jax import cli
from seg_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_main(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "main.py", "--config=configs/unet.py", *args],
                        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _config_files():
  files = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")) +
                 glob.glob(os.path.join(REPO, "configs", "sweeps", "*.py")))
  return [os.path.relpath(f, REPO) for f in files]


# Config files whose dataset needs a folder the user names.
NEEDS_ROOT = {"configs/unet_folder.py", "configs/unet_ade20k.py"}
# The presets some config files take after a colon (`configs/deeplabv3plus.py:large`).
PRESETS = ("large", "ade20k")


@pytest.mark.parametrize("path", _config_files())
def test_every_config_file_loads_and_validates(path):
  """Loaded as main.py loads it (ml_collections' config file loader), with every argument its
  get_config takes."""
  spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}",
                                                os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = [""] + (["large", "ade20k", "dataset=folder"] if "arg" in inspect.signature(
      module.get_config).parameters else [])
  for arg in args:
    if arg in PRESETS and f'"{arg}"' not in inspect.getsource(module):
      with pytest.raises(config_lib.ConfigError, match=f"config argument '{arg}': not one of"):
        module.get_config(arg)
      continue
    config = module.get_config(arg) if arg else module.get_config()
    if path in NEEDS_ROOT or config.dataset.name in ("folder", "ade20k"):
      with pytest.raises(config_lib.ConfigError, match=r"^config.dataset.root='': .* needs"):
        config_lib.validate(config)
      config.dataset.root = "/data/somewhere"
    if arg == "dataset=folder" and config_lib.task(config) == "instance":
      with pytest.raises(config_lib.ConfigError, match="needs instance annotations"):
        config_lib.validate(config)
      continue
    if arg == "dataset=folder" and config_lib.task(config) == "volumetric":
      with pytest.raises(config_lib.ConfigError, match="segments volumes; volumetric datasets"):
        config_lib.validate(config)
      continue
    config_lib.validate(config)
  assert set(_config_files()) >= {"configs/unet.py", "configs/sweeps/unet_norm.py"}


def test_a_config_file_chooses_its_dataset_and_model_by_argument():
  sys.path.insert(0, REPO)
  from configs import deeplabv3plus, unet
  config = deeplabv3plus.get_config("large,dataset=folder")
  assert config.model.name == "deeplabv3plus" and config.model.backbone == "resnet50"
  assert config.dataset.name == "folder" and config.dataset.root == ""
  assert config.dataset.image_size == 512   # the pipeline keys of the config are kept
  config = unet.get_config("model=deeplabv3plus")
  assert config.model.to_dict() == config_lib.base_config("deeplabv3plus").model.to_dict()
  with pytest.raises(config_lib.ConfigError, match=r"config argument 'smal': not one of "
                                                   r"dataset=NAME, model=NAME, large"):
    unet.get_config("smal")
  with pytest.raises(config_lib.ConfigError, match=r"^config.dataset.name='nope': unknown "
                                                   r"dataset; datasets: .*shapes.*folder"):
    unet.get_config("dataset=nope")


def test_default_configs_validate():
  sys.path.insert(0, REPO)
  from configs import unet
  config_lib.validate(unet.get_config())
  config_lib.validate(unet.get_config("large"))


def test_unknown_override_key_fails_before_anything_runs(tmp_path):
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.widht=8")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.model.widht: unknown config key (did you mean width?)")
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_another_models_key_says_whose_it_is(tmp_path):
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.aspp_rates=(1,2)")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.model.aspp_rates: not a key of this config's model; it is a key of "
      "deeplabv3plus (choose the model when loading the config: "
      "--config=FILE:model=deeplabv3plus)")
  # Chosen on the command line, the model is chosen when the config is loaded: its own keys
  # can then be set (aspp_rates is accepted; the misspelt key after it is the error).
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.name=deeplabv3plus",
                     "--config.model.aspp_rates=(1,2)", "--config.model.widht=8")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --config.model.widht: unknown config key (did you mean width?)")
  assert not os.path.exists(tmp_path / "wd")


def test_component_names_on_the_command_line_are_chosen_when_the_config_loads():
  move = cli.choose_components_when_loading
  assert move(["main.py", "--config=configs/mask_rcnn.py", "--config.dataset.name=coco_json",
               "--config.dataset.train_json=a.json"]) == [
      "main.py", "--config=configs/mask_rcnn.py:dataset=coco_json",
      "--config.dataset.train_json=a.json"]
  assert move(["main.py", "--config.model.name=segformer", "--config", "configs/unet.py:dataset=folder",
               "--config.dataset.name=shapes"]) == [
      "main.py", "--config=configs/unet.py:model=segformer,dataset=shapes"]
  assert move(["main.py", "--config=configs/deeplabv3plus.py:large"]) == [
      "main.py", "--config=configs/deeplabv3plus.py:large"]
  assert move(["main.py", "--workdir=w", "--config.dataset.name=x"]) == [
      "main.py", "--workdir=w", "--config.dataset.name=x"]  # the workdir's config: unchanged


@pytest.mark.parametrize("section,name", [("model", "pspnet"), ("dataset", "kitti")])
def test_unknown_model_or_dataset_name_is_one_line(section, name):
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^config.{section}.name='{name}': unknown {section}; {section}s: "):
    config_lib.base_config(**{section: name})


def test_bad_value_fails_with_one_line_naming_the_key(tmp_path):
  result = _run_main(f"--workdir={tmp_path}/wd", "--config.model.norm=bach")
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines[-1] == "error: config.model.norm='bach': must be one of batch, group, instance, none"
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_unknown_key_in_a_config_file_is_caught(data_dir):
  config = config_lib.base_config()
  config.model.unlocked = True  # a typo in a config file creates a new key
  with pytest.raises(config_lib.ConfigError, match=r"config.model.unlocked=True: unknown config key"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.optimizer.learnig_rate = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"did you mean optimizer.learning_rate\?"):
    config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("loss.name", "ce+lovasz", "unknown loss term 'lovasz'"),
    ("loss.name", "ce+ce", "repeated loss term"),
    ("loss.name", "bce", "needs dataset.num_classes=2"),
    ("batch_size", 0, "must be a number > 0"),
    ("model.dropout", 1.5, "must be in \\[0, 1\\)"),
    ("dataset.image_size", 36, "divisible by 16 \\(2\\*\\*model.depth=16\\)"),
    ("dataset.ignore_label", 3, "outside \\[0, num_classes=6\\)"),
    ("optimizer.name", "lamb", "must be one of sgd, adam, adamw"),
    ("loss.class_weights", (1.0, 2.0), "must be 6 non-negative numbers"),
    ("matmul_precision", "tf32", "must be one of default, high, highest"),
    ("optimizer.ema_decay", 1.0, "must be in \\[0, 1\\) \\(0 = off\\)"),
    ("optimizer.accumulate_steps", 0, "must be a positive integer"),
    ("optimizer.accumulate_steps", 3, None),  # 1000 steps: reported on num_train_steps
    ("checkpoint.best_mode", "largest", "must be one of max, min"),
    ("checkpoint.best_metric", "dice", "must be '' \\(off\\) or an eval scalar"),
    ("checkpoint.use", "newest", "must be latest, best or a step number"),
    ("checkpoint.use", "best", "needs checkpoint.best_metric"),
    ("dataset.resize_range", (30, 20), "\\(lo, hi\\) with 0 < lo <= hi"),
    ("dataset.resize_range", (0, 20), "\\(lo, hi\\) with 0 < lo <= hi"),
])
def test_bad_values(key, value, message):
  config = config_lib.base_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  if message is None:
    key, message = "num_train_steps", f"must be a multiple of optimizer.accumulate_steps={value}"
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}=.*{message}"):
    config_lib.validate(config)


def test_warmup_counts_optimizer_updates_under_accumulation():
  config = config_lib.base_config()
  config.num_train_steps, config.optimizer.accumulate_steps = 1000, 4
  config.optimizer.warmup_steps = 249
  config_lib.validate(config)  # 250 updates
  config.optimizer.warmup_steps = 250
  with pytest.raises(config_lib.ConfigError, match=r"^config.optimizer.warmup_steps=250: must be "
                     r"< the number of optimiser updates, 250 \(num_train_steps=1000 / "):
    config_lib.validate(config)


@pytest.mark.parametrize("flags,expected", [
    ((False, None, None, None), None),
    ((True, None, None, None), {"coordinator_address": None, "num_processes": None, "process_id": None}),
    # Each of the three implies --distributed; a lone --process_id is not ignored.
    ((False, "10.0.0.1:12345", 4, 3), {"coordinator_address": "10.0.0.1:12345", "num_processes": 4,
                                        "process_id": 3}),
    ((False, None, None, 1), {"coordinator_address": None, "num_processes": None, "process_id": 1}),
    ((False, None, 2, None), {"coordinator_address": None, "num_processes": 2, "process_id": None}),
    ((False, "[::1]:80", None, None), {"coordinator_address": "[::1]:80", "num_processes": None,
                                       "process_id": None}),
])
def test_distributed_flags_give_jaxs_arguments(flags, expected):
  from seg_jax import cli
  assert cli.distributed_options(*flags) == expected


@pytest.mark.parametrize("flags,message", [
    ((False, "host0", 2, 0), "--coordinator_address=host0: must be HOST:PORT"),
    ((False, "host0:port", 2, 0), "--coordinator_address=host0:port: must be HOST:PORT"),
    ((False, ":1234", 2, 0), "--coordinator_address=:1234: must be HOST:PORT"),
    ((False, "host0:70000", 2, 0), "--coordinator_address=host0:70000: must be HOST:PORT"),
    ((True, None, 0, None), "--num_processes=0: must be at least 1"),
    ((False, None, None, -1), "--process_id=-1: must be at least 0"),
    ((False, "h:1", 2, 2), "--process_id=2: must be below --num_processes=2"),
    ((False, "h:1", 2, None), "--coordinator_address needs both --num_processes and --process_id"),
    ((False, "h:1", None, 0), "--coordinator_address needs both --num_processes and --process_id"),
])
def test_bad_distributed_flags_are_one_line_errors(flags, message, capsys):
  from seg_jax import cli
  with pytest.raises(SystemExit) as exit_:
    cli.distributed_options(*flags)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_main_turns_distributed_flags_and_jax_errors_into_one_line(tmp_path):
  """Through main.py: a bad combination stops before JAX starts a cluster; a cluster JAX cannot
  form (no process count, none to detect) is one line too, not a traceback."""
  bad = _run_main(f"--workdir={tmp_path}", "--num_processes=2", "--process_id=5")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == "error: --process_id=5: must be below --num_processes=2"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORD"))}
  undetected = subprocess.run(
      [sys.executable, "main.py", "--config=configs/unet.py", f"--workdir={tmp_path}",
       "--distributed"], cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=120)
  assert undetected.returncode == 2, undetected.stderr[-2000:]
  last = undetected.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --distributed: jax.distributed.initialize failed: "), last
  assert "Traceback" not in undetected.stderr
  assert not os.listdir(tmp_path)


def test_with_dataset_keeps_the_pipeline_keys_and_resets_the_datasets_own():
  config = config_lib.base_config(dataset="shapes")
  config.dataset.image_size, config.dataset.augment.hue = 96, 0.0
  config.dataset.num_train, config.dataset.num_classes = 10, 6
  switched = config_lib.with_dataset(config, "oxford_iiit_pet")
  assert switched.dataset.image_size == 96 and switched.dataset.augment.hue == 0.0
  assert switched.dataset.num_classes == 3 and switched.dataset.eval_split == "test"
  assert "num_train" not in switched.dataset and switched.dataset.download is False
  # Every dataset's section is the pipeline keys, its name, class count, eval split, own keys.
  from seg_jax import registry
  for name in registry.dataset_names():
    section = set(config_lib.base_config(dataset=name).dataset)
    own = set(registry.dataset_entry(name).defaults)
    assert section - own == {*config_lib.PIPELINE_KEYS, "name", "num_classes", "eval_split"}, name
