"""Capture and restore every random number generator a training step may draw from.

The captured state holds only plain containers, ints, floats and tensors, so it
round-trips through ``torch.load(weights_only=True)`` without allowlisting any type.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

log = logging.getLogger("trainer.rng")

try:  # NumPy is optional: a training script that never imports it has no state to keep.
    import numpy as np
except ImportError:  # pragma: no cover - numpy is installed wherever the tests run
    np = None  # type: ignore[assignment]


def capture_rng() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global RNG, torch CPU and every CUDA device."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        # Python's state is a tuple of 625 ints; a list of ints is a plain container.
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            # uint32 words as int64: a tensor is accepted by weights_only, an ndarray is not.
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned; parts this process cannot use are skipped."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    # set_rng_state wants a CPU ByteTensor even when the file was loaded onto a GPU.
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "numpy" in state:
        if np is None:
            log.warning("checkpoint has a NumPy RNG state but NumPy is not importable; skipped")
        else:
            n = state["numpy"]
            keys = n["keys"].cpu().numpy().astype(np.uint32)
            np.random.set_state(
                (n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
            )
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            log.warning("checkpoint has CUDA RNG states but CUDA is not available; skipped")
            return
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            # Restore what lines up; a different GPU count cannot resume bit-exactly anyway.
            log.warning(
                "checkpoint has RNG states for %d CUDA devices, this process sees %d",
                len(cuda_states),
                count,
            )
        for device, s in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), device)
