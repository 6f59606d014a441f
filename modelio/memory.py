"""Keeping resident memory near one layer: weights stay memory-mapped until used and are handed back after.

``from_pretrained`` maps a safetensors checkpoint whose dtype matches the one asked (bf16 on bf16): the
weights are file pages that enter resident memory only when read. Pruning reads every layer once, so without
help the whole checkpoint ends up resident beside the smaller weights that replace it. ``release`` asks the
kernel to reclaim the pages of tensors already used (``madvise(MADV_PAGEOUT)``): clean file pages leave the
process and are read again from the file if touched, while written (anonymous) pages are kept or swapped,
never lost, so it is safe on any tensor. Where the call does not exist (not Linux, old kernels) it does nothing.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Iterable

import torch
from torch import nn

_PAGE = mmap.PAGESIZE
# Linux's MADV_PAGEOUT (since 5.4; Python's mmap module names it only from 3.12)
_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform.startswith("linux") else None)
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


Extent = tuple[int, int]  # (address, bytes) of a CPU storage


def trim_heap() -> None:
    """Hand the free memory at the heap's top and inside its arenas back to the kernel (glibc's ``malloc_trim``).

    A layer's work (float64 statistics, SVDs, refits) frees hundreds of MB in blocks below glibc's mmap
    threshold, which grows with use to 32 MB; the heap keeps them, and the compressed weights allocated between
    them pin the heap's top, so without this the resident set rises by about one layer's work per layer.
    Nothing where the call does not exist (not glibc)."""
    _madvise()
    trim = getattr(_libc, "malloc_trim", None) if _libc else None
    if trim is not None:
        trim(0)


def extents(tensors: Iterable[torch.Tensor]) -> list[Extent]:
    """The memory ranges of the CPU storages behind ``tensors``, each once."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return list(seen.items())


def module_extents(module: nn.Module) -> list[Extent]:
    return extents([*module.parameters(), *module.buffers()])


def release(ranges: Iterable[Extent]) -> None:
    """Hand the pages of ``ranges`` back to the kernel (see the module docstring); errors are ignored, since a
    range freed meanwhile is simply no longer mapped."""
    advise = _madvise()
    if advise is None or _PAGEOUT is None:
        return
    for address, size in ranges:
        start = address // _PAGE * _PAGE
        end = -(-(address + size) // _PAGE) * _PAGE
        advise(start, end - start, _PAGEOUT)


def release_module(module: nn.Module) -> None:
    release(module_extents(module))


_ALIGN = 64  # bytes: every storage in a spill file starts at a multiple of this (and of any element size)


def spill_module(module: nn.Module, keep: Iterable[Extent] = (), folder: str | None = None) -> int:
    """Move the CPU tensors of ``module`` (parameters and buffers) whose storages are not in ``keep`` into one
    temporary file, mapped back copy-on-write, and hand their pages back; return the bytes moved.

    What a layer's turn created (factors, kept channels, refitted weights) is otherwise anonymous memory that
    stays resident until the save; spilled, it becomes clean file pages like a memory-mapped checkpoint's, read
    again when touched and released after. The file is unlinked at once: the mapping keeps its data alive and
    the disk space goes with the last tensor. A later write to a spilled tensor copies its page, never the file.
    """
    import os
    import tempfile

    kept = {address for address, _ in keep}
    owners = [(owner, kind, name, tensor) for owner in module.modules()
              for kind in ("_parameters", "_buffers") for name, tensor in getattr(owner, kind).items()
              if tensor is not None and tensor.device.type == "cpu" and not tensor.is_meta and tensor.numel()]
    offsets: dict[int, int] = {}  # storage address -> byte offset in the file
    descriptor, path = tempfile.mkstemp(prefix="structprune-spill-", dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for _, _, _, tensor in owners:
                storage = tensor.untyped_storage()
                if storage.data_ptr() in kept or storage.data_ptr() in offsets:
                    continue
                offsets[storage.data_ptr()] = handle.tell()
                handle.write(torch.empty(0, dtype=torch.uint8).set_(storage).numpy().data)
                handle.write(b"\0" * (-handle.tell() % _ALIGN))
            size = handle.tell()
        if not offsets:
            return 0
        mapped = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    finally:
        os.unlink(path)
    for owner, kind, name, tensor in owners:
        offset = offsets.get(tensor.untyped_storage().data_ptr())
        if offset is None:
            continue
        element = tensor.element_size()
        view = torch.empty(0, dtype=tensor.dtype).set_(mapped, offset // element + tensor.storage_offset(),
                                                        tensor.shape, tensor.stride())
        if kind == "_parameters":
            tensor.data = view
        else:
            getattr(owner, kind)[name] = view
    release([(mapped.data_ptr(), size)])
    return size
