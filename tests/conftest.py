"""Shared fixtures: a tiny embedded dataset and tiny configs, built once per session."""

import os

# Before jax/tensorflow are imported anywhere: CPU only, no cloud lookups, quiet TF.
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import socket

import pytest

from seg_jax import config as config_lib


def reserved_port() -> socket.socket:
  """A socket bound to a free port, to hold for as long as a multi-process run uses the port: no
  other process can bind it meanwhile (closing it first, then starting the run, left a window in
  which another test on the machine could take the port). SO_REUSEPORT lets JAX's coordinator
  (gRPC, which sets it too) bind the same port; connections go to the coordinator, the only one
  listening."""
  s = socket.socket()
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  s.bind(("127.0.0.1", 0))
  return s


def tiny_config(data_dir: str):
  """A U-Net small enough to compile in seconds, on 32x32 shapes."""
  c = config_lib.base_config()
  c.dataset.data_dir = data_dir
  c.dataset.image_size = 32
  c.dataset.num_train = 48
  c.dataset.num_validation = 12
  c.dataset.num_test = 4
  c.dataset.shuffle_buffer = 48
  c.model.width = 8
  c.model.depth = 2
  c.batch_size = 8
  c.num_train_steps = 30
  c.log_every_steps = 5
  c.eval_every_steps = 30
  c.checkpoint_every_steps = 10
  c.num_eval_visuals = 4
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.compilation_cache_dir = ""
  return c


def tiny_detector_config(data_dir: str):
  """Mask R-CNN small enough to compile in seconds, on the same 32x32 shapes as tiny_config."""
  c = config_lib.with_model(tiny_config(data_dir), "mask_rcnn")
  c.model.backbone = "resnet10"
  c.model.width = 8
  c.model.stem = "small"
  c.dataset.max_instances = 8
  d = c.model
  d.fpn_features = 16
  d.anchor_sizes = (4, 8, 16, 32, 64)
  d.rpn_pre_nms_topk = 32
  d.rpn_post_nms_topk = 32
  d.rpn_num_samples = 32
  d.roi_num_samples = 16
  d.canonical_size = 28.0
  d.box_head_hidden = 32
  d.mask_head_features = 8
  d.mask_size = 14
  d.detections_per_image = 10
  c.optimizer.learning_rate = 3e-3
  c.num_train_steps = 20
  c.log_every_steps = 5
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data_dir):
  return tiny_config(data_dir)
