"""Hand the zero pages of a new llama.cpp context back to the kernel.

llama.cpp clears a context's KV cache with memset(0) when it makes it, and that makes
every page of the cache resident at once: 180 MiB for 4 streams of 2048 cells, held
from the start whether or not a stream ever gets that long. A page that holds only
zeros can be given back with madvise(MADV_DONTNEED): the kernel then maps its shared
zero page on a read and a fresh zeroed page on the first write, so the program reads
exactly what it read before, and the cache becomes resident as the streams fill it.

That holds for a page nobody writes between the check and the madvise. So:
- only memory that appeared while the context was being made is looked at (the
  anonymous private mappings that were not there before; glibc's brk heap is never
  one of them), and only in runs of zero pages of at least RUN_MIN bytes, less
  EDGE bytes at each end: an allocation of someone else's that shares a run's
  mapping (a CPython arena is 1 MiB, and has its first page written) stays out;
- from the check to the madvise, nothing here releases the GIL or blocks, the switch
  interval is raised (a thread already waiting for the GIL may still take it once)
  and the garbage collector is off (no finalizer frees memory mid-scan); the loop
  allocates nothing of size, and each run is given back as soon as it ends;
- it runs at start-up, when no other thread is inside llama.cpp or onnxruntime, and
  only for a CPU context (the engine skips it when layers go to a GPU, whose driver
  has threads of its own).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

Range = tuple[int, int]

BLOCK = 64 * 1024  # checked at a time
EDGE = 1 << 20  # left alone at each end of a zero run
RUN_MIN = 4 << 20  # shorter zero runs are left alone
MADV_DONTNEED = 4

_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: calls keep the GIL
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int
_ZERO = ctypes.create_string_buffer(BLOCK)


def anonymous_ranges() -> list[Range]:
    """The process's private, writable, anonymous mappings (no name: not the brk heap,
    not a stack, not a file)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) == 5 and fields[1] == "rw-p":
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def new_ranges(before: list[Range], after: list[Range]) -> list[Range]:
    """The parts of `after` that no range of `before` covers."""
    fresh = []
    old = sorted(before)
    for start, end in sorted(after):
        at = start
        for old_start, old_end in old:
            if old_end <= at or old_start >= end:
                continue
            if old_start > at:
                fresh.append((at, old_start))
            at = max(at, old_end)
        if at < end:
            fresh.append((at, end))
    return fresh


def zero_runs(ranges: list[Range]) -> Iterator[Range]:
    """Runs of whole zero blocks in `ranges`, trimmed by EDGE at each end."""
    zero = ctypes.addressof(_ZERO)
    for start, end in ranges:
        first = -(-start // BLOCK) * BLOCK
        last = end // BLOCK * BLOCK
        run = None
        address = first
        while address <= last:
            is_zero = address < last and _memcmp(address, zero, BLOCK) == 0
            if is_zero and run is None:
                run = address
            elif not is_zero and run is not None:
                if address - run >= RUN_MIN:
                    yield run + EDGE, address - EDGE
                run = None
            address += BLOCK


@contextmanager
def others_held() -> Iterator[None]:
    """Other Python threads (bar one already waiting) do not take the GIL, and the
    garbage collector does not run, while this runs (nothing inside blocks)."""
    interval = sys.getswitchinterval()
    collecting = gc.isenabled()
    sys.setswitchinterval(1000.0)
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
        sys.setswitchinterval(interval)


def release(before: list[Range]) -> int:
    """Give back the zero pages of the memory mapped since `before` was taken; the
    number of bytes given back (resident or not)."""
    fresh = new_ranges(before, anonymous_ranges())  # reading the maps may block
    released = 0
    with others_held():
        for start, end in zero_runs(fresh):
            if _madvise(start, end - start, MADV_DONTNEED) == 0:
                released += end - start
    return released
