"""Seeds derived from several integers: every random draw of sdtune is a pure function of them."""

from __future__ import annotations

import numpy as np


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed from ``entropy`` (NumPy's SeedSequence: well mixed, and the same everywhere)."""
    return int(np.random.SeedSequence([int(value) for value in entropy]).generate_state(1)[0])
