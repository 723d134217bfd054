"""Normalisation ablation: U-Net with batch norm vs without any normalisation.

configs/unet.py with a 6x shorter schedule (400 steps instead of 2400), 2
variants x 3 seeds = 6 runs, so that the whole sweep finishes in under 15
minutes on an idle 2-core CPU (see README, "Ablations", for the measured
time). At this learning rate (AdamW 3e-3) the network without normalisation
learns far more slowly: a real difference, well outside the spread over seeds.
The seeds vary initialisation, data order and augmentation; the dataset is
fixed by dataset.seed.

  python -m seg_jax.sweep --config=configs/sweeps/unet_norm.py --workdir=runs/unet_norm

Trained on its own, the file is the batch-norm run with seed 0:
  python main.py --config=configs/sweeps/unet_norm.py --workdir=runs/unet_norm_one
"""

import ml_collections

from configs.sweeps import unet_losses


def get_config() -> ml_collections.ConfigDict:
  return unet_losses.get_config()   # configs/unet.py on the same 400-step schedule


def get_sweep() -> dict:
  """Every combination of the axes' values (config keys as in seg_jax/config.py), each
  trained with `seeds` seeds (config.seed, config.seed + 1, ...); the table reports
  `metrics`, the first one is plotted."""
  return {
      "axes": {"model.norm": ["batch", "none"]},
      "seeds": 3,
      "metrics": ["eval/dice", "eval/miou"],
  }
