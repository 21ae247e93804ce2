"""Test-wide settings: one CPU thread (faster than two on a shared 2-core machine)."""

import torch

torch.set_num_threads(1)
