"""Loss ablation: cross-entropy vs soft Dice vs both, on the shapes dataset.

configs/unet.py with a 6x shorter schedule (400 steps instead of 2400), so
that the whole sweep, 3 losses x 2 seeds = 6 runs, finishes in about 12
minutes on an idle 2-core CPU (per run ~80 s of steps at the 5.1 steps/s
main.py reaches, plus ~25 s of start-up, compilation and evaluations). The
seeds vary initialisation, data order and augmentation; the dataset is fixed
by dataset.seed.

  python -m seg_jax.sweep --config=configs/sweeps/unet_losses.py --workdir=runs/unet_losses

Trained on its own, the file is the ce+dice run with seed 0:
  python main.py --config=configs/sweeps/unet_losses.py --workdir=runs/unet_losses_one
"""

import ml_collections

from configs import unet


def get_config() -> ml_collections.ConfigDict:
  config = unet.get_config()
  config.num_train_steps = 400
  config.optimizer.warmup_steps = 40
  config.log_every_steps = 40
  config.eval_every_steps = 80          # 5 points per curve
  config.checkpoint_every_steps = 200
  return config


def get_sweep() -> dict:
  """Every combination of the axes' values (config keys as in seg_jax/config.py), each
  trained with `seeds` seeds (config.seed, config.seed + 1, ...); the table reports
  `metrics`, the first one is plotted."""
  return {
      "axes": {"loss.name": ["ce", "dice", "ce+dice"]},
      "seeds": 2,
      "metrics": ["eval/dice", "eval/miou"],
  }
