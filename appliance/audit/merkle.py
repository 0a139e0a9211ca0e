"""The RFC 6962 Merkle tree over the audit records, and its proofs.

Leaf i (0-based) is record i + 1: its data is the record's stored hash (the 32 bytes
its hex spells), which covers every column and the link to the record before, so a
leaf commits to the record and, through the chain, to all before it. Leaf hash
SHA-256(0x00 || data), node hash SHA-256(0x01 || left || right), the empty tree's
root SHA-256(""). The tree size is the last record's seq: records purged from the
front still count, their part of the tree kept as the few subtree hashes that later
proofs need (`Tree.known`).

A checkpoint needs the root, and a witness a consistency proof from the size it last
cosigned: `Tree` computes both from leaf hashes read on demand, keeping the hashes of
the complete subtrees it met (they never change in an append-only log), so that after
the first a checkpoint reads about CHUNK leaves and hashes O(log n) nodes.
`Frontier` walks all leaves once, in order, giving the root at any size on the way:
what `audit verify` uses to check every cosigned root in one pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# Leaves read and hashed at once; also the smallest complete subtree Tree remembers.
CHUNK = 1024

Range = tuple[int, int]  # [start, end) of leaf indexes


class MissingNodes(Exception):
    """A hash needs leaves that are gone (purged) and no kept subtree covers them."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def record_leaf(record_hash_hex: str) -> bytes:
    """A record's leaf hash, from its stored (hex) hash."""
    return hashlib.sha256(b"\x00" + bytes.fromhex(record_hash_hex)).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 6962 splits."""
    return 1 << ((n - 1).bit_length() - 1)


def _perfect(start: int, end: int) -> bool:
    n = end - start
    return n > 0 and n & (n - 1) == 0 and start % n == 0


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH of leaf hashes, in O(n) with a stack of complete subtrees."""
    if not leaves:
        return EMPTY_ROOT
    frontier = Frontier()
    for leaf in leaves:
        frontier.append(leaf)
    return frontier.root()


def compact_range(start: int, end: int) -> list[Range]:
    """The fewest complete, aligned subtrees that cover [start, end), left to right."""
    out: list[Range] = []
    while start < end:
        size = start & -start if start else 1 << (end.bit_length())
        while start + size > end:
            size >>= 1
        out.append((start, start + size))
        start += size
    return out


class Frontier:
    """The complete subtrees covering [0, size): append leaves, read the root at any
    size on the way. Can start from kept subtree hashes (a purged log's front)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, hash), left to right

    @classmethod
    def from_nodes(cls, size: int, nodes: Mapping[Range, bytes]) -> Frontier:
        frontier = cls()
        for start, end in compact_range(0, size):
            if (start, end) not in nodes:
                raise MissingNodes(f"no kept hash for leaves {start}..{end - 1}")
            frontier._stack.append((end - start, nodes[(start, end)]))
        frontier.size = size
        return frontier

    def append(self, leaf: bytes) -> None:
        size, digest = 1, leaf
        while self._stack and self._stack[-1][0] == size:
            left = self._stack.pop()[1]
            size, digest = size * 2, node_hash(left, digest)
        self._stack.append((size, digest))
        self.size += 1

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        digest = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            digest = node_hash(left, digest)
        return digest

    def nodes(self) -> dict[Range, bytes]:
        out, start = {}, 0
        for size, digest in self._stack:
            out[(start, start + size)] = digest
            start += size
        return out


# Reads the leaf hashes of leaves [start, end); raises MissingNodes for purged ones.
LeafReader = Callable[[int, int], list[bytes]]


class Tree:
    """An RFC 6962 tree whose leaves are read on demand (from the database), with
    ``known`` subtree hashes standing in for leaves before ``first`` (purged)."""

    def __init__(
        self, leaves: LeafReader, first: int = 0, known: Mapping[Range, bytes] | None = None
    ) -> None:
        self.leaves = leaves
        self.first = first
        self.known: dict[Range, bytes] = dict(known or {})
        self._cache: dict[Range, bytes] = {}

    def hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end])."""
        if end <= start:
            return EMPTY_ROOT
        key = (start, end)
        found = self.known.get(key) or self._cache.get(key)
        if found is not None:
            return found
        n = end - start
        if start >= self.first and n <= CHUNK:
            leaves = self.leaves(start, end)
            if len(leaves) != n:
                raise MissingNodes(f"leaves {start}..{end - 1}: {len(leaves)} of {n} found")
            digest = root_of(leaves)
        elif n == 1:
            raise MissingNodes(f"leaf {start} is purged and no kept hash covers it")
        else:
            k = split(n)
            digest = node_hash(self.hash(start, start + k), self.hash(start + k, end))
        if n >= CHUNK and _perfect(start, end):
            self._cache[key] = digest  # complete: the same forever in an append-only log
        return digest

    def root(self, size: int) -> bytes:
        return self.hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 6962 2.1.1 PATH(index, D[0:size])."""
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size}")
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = split(end - start)
            if index < start + k:
                proof.append(self.hash(start + k, end))
                end = start + k
            else:
                proof.append(self.hash(start, start + k))
                start += k
        return proof[::-1]

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """RFC 6962 2.1.2 PROOF(old, D[0:new]); empty for old 0 or old == new."""
        if not 0 <= old <= new:
            raise ValueError(f"no consistency proof from {old} to {new}")
        if old in (0, new):
            return []
        proof: list[bytes] = []
        start, end, m, whole = 0, new, old, True
        while m != end - start:
            k = split(end - start)
            if m <= k:
                proof.append(self.hash(start + k, end))
                end = start + k
            else:
                proof.append(self.hash(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self.hash(start, end))
        return proof[::-1]

    def nodes_for(self, sizes: Iterable[int], cut: int) -> dict[Range, bytes]:
        """The subtree hashes to keep when leaves [0, cut) are purged, so that roots of
        sizes >= cut, and proofs to them from each of ``sizes`` (the sizes a witness
        may still hold), can be computed without those leaves."""
        wanted = set(compact_range(0, cut))
        for size in sizes:
            if 0 < size < cut:
                wanted |= set(compact_range(0, size)) | set(compact_range(size, cut))
        return {r: self.hash(*r) for r in sorted(wanted)}


def _ok_hashes(*hashes: bytes) -> bool:
    return all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in hashes)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2: is ``leaf`` the index-th leaf of the tree with ``root``?"""
    if not (0 <= index < size and _ok_hashes(leaf, root, *proof)):
        return False
    fn, sn, digest = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            digest = node_hash(p, digest)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            digest = node_hash(digest, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and digest == root


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: is the tree of ``new_root`` an append-only extension of the
    tree of ``old_root``? (Old size 0: any tree is, with an empty proof.)"""
    if not (0 <= old <= new and _ok_hashes(old_root, new_root, *proof)):
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof
    if not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:  # the old tree is a complete subtree: its root starts
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root


def encode_nodes(nodes: Mapping[Range, bytes]) -> dict[str, str]:
    return {f"{a}:{b}": h.hex() for (a, b), h in sorted(nodes.items())}


def decode_nodes(data: Mapping[str, str]) -> dict[Range, bytes]:
    out: dict[Range, bytes] = {}
    for key, value in data.items():
        a, b = key.split(":")
        out[(int(a), int(b))] = bytes.fromhex(value)
    return out
