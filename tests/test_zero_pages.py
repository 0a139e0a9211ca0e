"""Giving zero pages back (appliance/engines/zero_pages.py): on real anonymous memory,
what was zero still reads zero and is no longer resident, what was written is kept."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

from appliance.engines import zero_pages

MIB = 1 << 20


def resident_bytes(start: int, end: int) -> int:
    """Resident bytes of the mappings inside [start, end) (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            inside = low >= start and high <= end
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


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
