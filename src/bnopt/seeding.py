"""Seeds: the global generators of a run, and independent streams derived from the run seed.

Everything random that must not depend on the order of events — noisy BN's noise, the activation probe's
unit, the landscape probe's random direction — draws from a generator seeded by ``derived_seed(seed,
what, when)``, never from the global stream the training loop consumes.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: object) -> int:
    """A 64-bit seed that depends on ``parts`` alone, stable across processes and Python versions."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
