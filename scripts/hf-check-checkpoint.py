#!/usr/bin/env python3
"""Loads a tessera checkpoint directory with Hugging Face transformers (AutoModelForCausalLM,
from the config.json tessera writes beside model.safetensors) and compares its logits on the
first window of a text file with `tessera eval --dump-logits`'s.

    tessera eval --checkpoint runs/tiny --data FILE --seq 64 --device cpu --dump-logits /tmp/logits.npy
    python3 scripts/hf-check-checkpoint.py runs/tiny/step-00000600 FILE 64 /tmp/logits.npy

Needs numpy, torch and transformers.
"""
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def main():
    checkpoint, text, seq, logits = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval().double()
    ids = torch.tensor([list(open(text, "rb").read()[:seq])])
    with torch.no_grad():
        reference = model(ids).logits[0].numpy()
    ours = np.load(logits)
    error = np.abs(ours - reference).max()
    print(f"max |tessera - transformers| = {error:.3g} (largest logit {np.abs(reference).max():.3g})")
    sys.exit(0 if error < 1e-3 * max(1.0, np.abs(reference).max()) else 1)


if __name__ == "__main__":
    main()
