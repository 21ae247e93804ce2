"""Warm the text-feature cache for dataset folders: python scripts/extract_text.py ENCODER DIR..."""

import sys
from pathlib import Path

from models.data import read_jsonl
from service.features.text import get_text_encoder

encoder = get_text_encoder(sys.argv[1], device="cpu", num_threads=1)
for folder in sys.argv[2:]:
    for split in ("train", "dev"):
        texts = [u.text for c in read_jsonl(Path(folder) / f"{split}.jsonl") for u in c.utterances]
        vectors, present = encoder.encode_with_mask(texts, show_progress=True)
        print(folder, split, vectors.shape, int(present.sum()), flush=True)
