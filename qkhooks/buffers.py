"""Output buffers reused from batch to batch on the CPU, so that a recording's maps are not written into fresh pages.

Each batch a recording hands out tensors of the same shapes: every layer's query and key maps, its full maps. On
the CPU torch takes such blocks (a few MB each) from malloc, which maps them in from the kernel and hands them back
when they are freed, so every batch writes its maps into new pages, one page fault per 4 KiB, and the model's own
activations then land in memory the maps moved. On a 2-core VM this cost more than the products themselves (ViT-S,
batch 8, all modes: ~11,000 faults and about +5 % per forward, benchmarks/ANALYSIS.md, round 14). Reusing the same
blocks keeps the process's memory the same from batch to batch, as it is for the plain forward.

A buffer is handed out again only when nothing outside its pool holds its storage: torch's own count of the
storage's holders (every tensor and view of it, numpy array, DLPack capsule or memoryview counts), so no caller,
thread or sink can see a buffer it still holds overwritten; a storage moved to shared memory (sent to another
process) is never reused. A caller that keeps every batch's maps just gets fresh memory each batch. On CUDA, torch's
caching allocator already reuses its blocks: there the buffers are plain ``torch.empty``.

Buffers are kept while a recording uses them: from its first attach until it is released (the end of its ``with``
block) or collected (:meth:`OutputBuffers.attach`, :meth:`~OutputBuffers.detach`). When the last such recording ends,
every buffer nobody holds is let go, so a finished recording keeps no memory beyond the maps its caller holds. A
recording attached and detached around each batch keeps its buffers in between. The pools of an attention module
live as long as the module (weakly keyed, as the spectrum cache is), so ``record()`` entered per batch finds the
previous batch's buffers again.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch
from torch import nn

__all__ = ["OutputBuffers", "SCRATCH", "output_buffers", "release_buffers"]


def _holders(t: torch.Tensor) -> int:
    """How many holders ``t``'s storage has (tensors of it, numpy arrays, capsules; the storage object made here
    for the call counts one)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


try:  # a private torch function: without it no buffer is ever reused (every call allocates, as torch does)
    _ALONE: int | None = _holders(torch.empty(1))
except (AttributeError, RuntimeError):  # pragma: no cover - torch without the function
    _ALONE = None

_MAX_SHAPES = 8  # (role, shape) entries a pool keeps at most: image sizes that change batch to batch do not pile up


class OutputBuffers:
    """Buffers for outputs of one attention module (or the shared :data:`SCRATCH`), by role and shape.

    :meth:`empty` returns an uninitialised tensor, as ``torch.empty`` does, which the caller overwrites whole.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple, list[torch.Tensor]] = {}  # (role, shape, dtype, device) -> buffers, least recent first
        self._users = 0
        self._lock = threading.Lock()  # two forwards on one module (threads) never take one buffer

    def empty(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
              keep: int = 3) -> torch.Tensor:
        """An uninitialised (shape) tensor: a kept buffer of this role and shape that nothing else holds, else a new
        one, kept while fewer than ``keep`` are (maps: three, the last batch's that a recording holds as ``last``,
        the one being written and one for a second holder such as the writer thread's queue)."""
        shape, device = tuple(int(s) for s in shape), torch.device(device)
        if device.type != "cpu" or _ALONE is None or keep < 1 or self._users < 1:
            return torch.empty(shape, dtype=dtype, device=device)
        spec = (role, shape, dtype, device)
        with self._lock:
            kept = self._kept.pop(spec, [])
            self._kept[spec] = kept  # most recently used last
            kept[:] = [buf for buf in kept if not buf.is_shared()]  # sent to another process: it reads it from there
            chosen = next((buf for buf in kept if _holders(buf) == _ALONE), None)
            if chosen is None:
                with torch.inference_mode(False):  # a buffer made in inference mode could not be written outside it
                    chosen = torch.empty(shape, dtype=dtype, device=device)
                if len(kept) < keep:
                    kept.append(chosen)
            if len(self._kept) > _MAX_SHAPES:
                self._drop_free(list(self._kept)[:-_MAX_SHAPES])
            # a tensor of its own (not a view of the kept one, whose _base would be the pool's): its holders count
            return chosen.detach().view(shape)

    def attach(self) -> None:
        """A recording starts using these buffers."""
        with self._lock:
            self._users += 1

    def detach(self) -> None:
        """A recording stops using them: when none is left, let go of every buffer nobody holds."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._drop_free(list(self._kept))

    def _drop_free(self, specs: list[tuple]) -> int:
        """Forget the buffers of ``specs`` that nothing else holds (lock held); the bytes they had."""
        freed = 0
        for spec in specs:
            kept = self._kept.get(spec, [])
            free = [buf for buf in kept if _holders(buf) == _ALONE]
            freed += sum(buf.numel() * buf.element_size() for buf in free)
            kept[:] = [buf for buf in kept if _holders(buf) != _ALONE]
            if not kept:
                del self._kept[spec]
        return freed

    def nbytes(self) -> int:
        """Bytes of the buffers kept (free or handed out)."""
        with self._lock:
            return sum(b.numel() * b.element_size() for bufs in self._kept.values() for b in bufs)

    def release(self) -> int:
        """Let go of every buffer nobody holds now (recordings still attached keep working: they allocate
        afresh); the bytes freed."""
        with self._lock:
            return self._drop_free(list(self._kept))


SCRATCH = OutputBuffers()
"""Temporaries every layer shares (the logits before their softmax, the modes' product before its per-image copy):
free again as soon as the layer's outputs are written, so one buffer per shape serves them all."""

_BY_MODULE: "weakref.WeakKeyDictionary[nn.Module, OutputBuffers]" = weakref.WeakKeyDictionary()
_BY_MODULE_LOCK = threading.Lock()


def output_buffers(module: nn.Module | None) -> OutputBuffers | None:
    """The output buffers of ``module`` (an attention module), made on first use; None for no module (a site
    described without one: its outputs are allocated afresh)."""
    if module is None:
        return None
    with _BY_MODULE_LOCK:
        buffers = _BY_MODULE.get(module)
        if buffers is None:
            buffers = _BY_MODULE[module] = OutputBuffers()
        return buffers


def release_buffers(model: nn.Module) -> int:
    """Let go of the buffers kept for every module of ``model`` and the shared scratch buffers that nothing holds
    (maps a caller still holds stay valid, and are not counted); returns the bytes freed."""
    freed = SCRATCH.release()
    for module in model.modules():
        buffers = _BY_MODULE.get(module)
        if buffers is not None:
            freed += buffers.release()
    return freed
