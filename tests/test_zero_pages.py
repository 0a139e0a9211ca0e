"""Giving zero pages back (appliance/engines/zero_pages.py): on real anonymous memory,
what was zero still reads zero and is no longer resident, what was written is kept."""

from __future__ import annotations

import ctypes
import mmap

from appliance.engines import zero_pages

MIB = 1 << 20


def resident_bytes(start: int, end: int) -> int:
    """Resident bytes in [start, end), page by page (mincore: the mapping may have been
    merged with its neighbours, so smaps cannot tell)."""
    pages = (end - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), vector) == 0
    return sum(v & 1 for v in vector) * mmap.PAGESIZE


def test_new_ranges_are_what_was_not_mapped_before() -> None:
    before = [(0x1000, 0x3000), (0x8000, 0x9000)]
    after = [(0x1000, 0x5000), (0x6000, 0x7000), (0x7000, 0xA000)]
    assert zero_pages.new_ranges(before, after) == [
        (0x3000, 0x5000),
        (0x6000, 0x7000),
        (0x7000, 0x8000),
        (0x9000, 0xA000),
    ]


def test_zero_pages_are_given_back_and_written_ones_kept() -> None:
    size = 24 * MIB
    before = zero_pages.anonymous_ranges()
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        ctypes.memset(base, 0, size)  # as llama.cpp clears its KV cache: all resident
        marker = 12 * MIB + 5000
        region[marker : marker + 5] = b"kept!"
        assert resident_bytes(base, base + size) >= size - MIB

        released = zero_pages.release(before)

        # Two runs of zero pages, each side of the written page, less their edges.
        assert released >= size - 6 * MIB
        assert resident_bytes(base, base + size) <= 6 * MIB
        assert region[marker : marker + 5] == b"kept!"
        data = bytes(region)
        assert data.count(0) == size - 5  # every other byte still reads zero
        region[0:4] = b"more"  # and the memory is still there to write
        assert region[0:4] == b"more"
    finally:
        del base
        region.close()


def test_memory_mapped_before_is_left_alone() -> None:
    size = 16 * MIB
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        ctypes.memset(base, 0, size)
        before = zero_pages.anonymous_ranges()  # taken after: the region is not new
        zero_pages.release(before)
        assert resident_bytes(base, base + size) >= size - MIB
    finally:
        del base
        region.close()
