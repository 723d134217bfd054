"""Imported before anything else by the PyTorch workers of the peer benchmarks (compare_*.py).

PyPI's torch 2.14 crashes (SIGSEGV) when it, or the triton it loads with its optimizers, is
first imported after TensorFlow's and XLA's native libraries are in the process.
"""

import torch  # pylint: disable=unused-import
import torch._dynamo  # pylint: disable=unused-import  # the optimizers load it, and it loads triton
