"""Copy a training state into CPU memory fast enough to do it inside the loop.

The copy is the only part of an asynchronous save the loop waits for; the background
writer then serializes the copy while training changes the live tensors. It keeps the
state's exact shape: each storage is copied once and every tensor is rebuilt as the
same view (offset, size, stride) of its copy, so ``torch.save`` of the copy writes the
same bytes as ``torch.save`` of the original would have (on CPU).

Buffers are reused from one snapshot to the next (the previous write has finished by
then: one save in flight at most). Fresh memory costs a page fault per 4 KiB on first
touch, which would otherwise dominate the stall; CUDA storages go to pinned buffers,
whose copy is queued on the current stream, and the writer waits for it on an event.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Buffers are touched this much at a time, so that a stop is seen within a few ms.
TOUCH_CHUNK = 64 * 1024 * 1024


def with_attrs(original: dict[Any, Any], items: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A dict (an OrderedDict for one) of ``items``, carrying ``original``'s attributes.

    ``Module.state_dict()`` hangs a ``_metadata`` attribute (per-module versions that
    ``load_state_dict`` uses to upgrade old layouts) on its OrderedDict; pickle keeps
    it, so a copy must too.
    """
    out: dict[Any, Any] = OrderedDict(items) if isinstance(original, OrderedDict) else dict(items)
    extra = getattr(original, "__dict__", None)
    if extra:
        out.__dict__.update(extra)
    return out


class SnapshotPool:
    """CPU copies of a state, reusing the buffers of the previous copy where sizes match."""

    def __init__(self) -> None:
        self._buffers: list[torch.UntypedStorage] = []

    def release(self) -> None:
        """Drop the kept buffers (the next snapshot allocates afresh)."""
        self._buffers = []

    @property
    def nbytes(self) -> int:
        """Bytes held for reuse."""
        return sum(b.nbytes() for b in self._buffers)

    @staticmethod
    def sizes(state: Any) -> list[tuple[int, bool]]:
        """``(bytes, pinned)`` of each distinct storage in ``state``, in copy order."""
        seen: set[tuple[str, int | None, int]] = set()
        out: list[tuple[int, bool]] = []
        for t in _tensors(state):
            if _exotic(t):
                continue
            src = t.untyped_storage()
            key = (src.device.type, src.device.index, src.data_ptr())
            if key not in seen:
                seen.add(key)
                out.append((src.nbytes(), src.device.type == "cuda"))
        return out

    def allocate(self, sizes: list[tuple[int, bool]], stop: threading.Event | None = None) -> bool:
        """Make (and touch) buffers of these sizes, reusing the ones already held; whether
        every one was made and touched (False: ``stop`` came first).

        ``stop`` set: touch no more (checked every :data:`TOUCH_CHUNK` bytes). No save
        will copy into them any more (the loop is stopping), and each page touched now
        takes CPU from the save that is written instead. What is allocated is kept: an
        untouched page is still a valid buffer, only its first write costs more.
        """

        def stopped() -> bool:
            return stop is not None and stop.is_set()

        buffers: list[torch.UntypedStorage] = []
        complete = True
        for i, (nbytes, pinned) in enumerate(sizes):
            buf = self._buffers[i] if i < len(self._buffers) else None
            if buf is None or buf.nbytes() != nbytes or buf.is_pinned() != pinned:
                if stopped():
                    complete = False
                    break
                t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
                for at in range(0, nbytes, TOUCH_CHUNK):  # first touch now, not in the loop
                    if stopped():
                        complete = False
                        break
                    t[at : at + TOUCH_CHUNK].zero_()
                buf = t.untyped_storage()
            buffers.append(buf)
        self._buffers = buffers
        return complete

    def copy(self, state: Any) -> tuple[Any, Callable[[], None]]:
        """A copy of ``state`` in CPU memory, and a function that waits until it is filled.

        The copy references buffers this pool reuses, so take the next one only after
        the previous has been written. On CPU the copy is complete on return; call the
        returned function before reading it anyway (CUDA copies may still be queued).
        """
        memo: dict[tuple[str, int | None, int], torch.UntypedStorage] = {}
        used: list[torch.UntypedStorage] = []
        cuda_devices: set[int] = set()

        def storage_copy(src: torch.UntypedStorage) -> torch.UntypedStorage:
            key = (src.device.type, src.device.index, src.data_ptr())
            hit = memo.get(key)
            if hit is not None:
                return hit  # shared storage (tied weights, views): copied once, kept shared
            on_cuda = src.device.type == "cuda"
            i = len(used)
            buf = self._buffers[i] if i < len(self._buffers) else None
            if buf is None or buf.nbytes() != src.nbytes() or buf.is_pinned() != on_cuda:
                buf = (
                    torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
                    if on_cuda
                    else torch.empty(src.nbytes(), dtype=torch.uint8).untyped_storage()
                )
            if src.nbytes():
                buf.copy_(src, non_blocking=on_cuda)
            if on_cuda:
                cuda_devices.add(src.device.index or 0)
            memo[key] = buf
            used.append(buf)
            return buf

        def tensor_copy(t: torch.Tensor) -> torch.Tensor:
            if _exotic(t):
                return t.detach().to("cpu", copy=True)
            buf = storage_copy(t.untyped_storage())
            out = torch.empty((0,), dtype=t.dtype).set_(
                buf, t.storage_offset(), t.size(), t.stride()
            )
            if isinstance(t, torch.nn.Parameter):
                return torch.nn.Parameter(out, requires_grad=t.requires_grad)
            if t.requires_grad:
                out.requires_grad_(True)
            return out

        def walk(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return tensor_copy(obj)
            if isinstance(obj, dict):
                return with_attrs(obj, [(k, walk(v)) for k, v in obj.items()])
            if isinstance(obj, list):
                return [walk(v) for v in obj]
            if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
                return tuple(walk(v) for v in obj)
            if isinstance(obj, set):
                return set(obj)
            return obj  # numbers, strings, dtypes, devices: immutable

        copied = walk(state)
        self._buffers = used
        if not cuda_devices:
            return copied, no_wait
        # One event per device, recorded after every copy queued on its current stream.
        events = []
        for device in sorted(cuda_devices):
            with torch.cuda.device(device):
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                events.append(event)

        def wait() -> None:
            for e in events:
                e.synchronize()

        return copied, wait


def _exotic(t: torch.Tensor) -> bool:
    """Tensors copied plainly (to a fresh CPU tensor), not through a pooled storage."""
    return (
        t.layout != torch.strided
        or t.is_quantized
        or t.is_conj()
        or t.is_neg()
        or t.device.type not in ("cpu", "cuda")
    )


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a nested state, in the order :meth:`SnapshotPool.copy` visits them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for v in obj:
            yield from _tensors(v)


def no_wait() -> None:
    """Nothing to wait for: a state already in CPU memory (a CPU copy is done on return)."""
