"""What the framework reference scripts share beyond :mod:`trainer.example`.

``python -m trainer.example_hf`` and ``python -m trainer.example_lightning`` resume from
the newest verified checkpoint their callback's ``latest_checkpoint`` finds; the first
line each prints for it (``start step=0``, or ``resumed``, and the final hash at once
when that checkpoint is the last step) is here; their entry point is
:func:`trainer.example.script_main`, as every reference script's. What must not live
here: anything of a framework (this module imports none), or the flags and event lines
every reference script prints (:mod:`trainer.example`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from daemon.layout import read_manifest
from trainer.example import out, params_sha256, print_resumed, script_main

__all__ = ["begin", "script_main"]


def begin(step_dir: Path | None, steps: int, load_final: Callable[[Path], nn.Module]) -> bool:
    """The first line of a run resuming from ``step_dir`` (None: there is no checkpoint).

    True when that checkpoint is the ``steps``-th step: nothing is left to train, and
    the final hash (of the model ``load_final(step_dir)`` loads) is printed already.
    """
    if step_dir is None:
        out("start step=0")
        return False
    manifest = read_manifest(step_dir)
    print_resumed(manifest.step, manifest.reason, steps)
    if manifest.step != steps:
        return False
    out(f"final_params_sha256={params_sha256(load_final(step_dir))}")
    return True
