"""Test-wide settings.

- One CPU thread (faster than two on a shared 2-core machine).
- Unpacked text-encoder models (MPNet is a 420 MB zip split over five wheels) are shared by
  every test and server process through ``MERC_MODELS_DIR``, even where a test gives a
  server a fresh, empty embedding cache (``MERC_CACHE_DIR``).
"""

import os

import torch

from service.features.text import default_cache_root

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MERC_MODELS_DIR", str(default_cache_root() / "models"))
