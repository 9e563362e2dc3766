"""The producer's partitioner: the Java client's murmur2 partitions, as aiokafka's, in fewer Python
steps per record, and for a whole batch of keys at once in numpy."""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import numpy as np

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# Keys of one length hashed together in numpy from this many on; fewer cost less one by one.
_VECTOR_MIN_KEYS = 16


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of `data` (org.apache.kafka.common.utils.Utils.murmur2, unsigned 32 bits),
    equal to `aiokafka.partitioner.murmur2`: whole words are read by `struct` at once and each step
    masks only where a product can pass 32 bits."""
    length = len(data)
    h = _SEED ^ length
    words = length >> 2
    if words:
        for k in struct.unpack_from(f"<{words}I", data):
            k = (k * _M) & _MASK
            k = ((k ^ (k >> 24)) * _M) & _MASK
            h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        end = length - tail
        if tail == 3:
            h ^= data[end + 2] << 16
        if tail >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def murmur2_same_length(keys: Sequence[bytes]) -> list[int]:
    """`murmur2` of each of `keys`, which all have one length: every step runs on a column of
    uint32 (which wraps at 32 bits as the hash needs), once for all the keys."""
    length = len(keys[0])
    rows = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), length)
    m = np.uint32(_M)
    h = np.full(len(keys), _SEED ^ length, dtype=np.uint32)
    words = length >> 2
    if words:
        columns = np.ascontiguousarray(rows[:, : words * 4]).view("<u4")
        for word in range(words):
            k = columns[:, word] * m
            k ^= k >> np.uint32(24)
            k *= m
            h *= m
            h ^= k
    tail = length & 3
    if tail:
        end = length - tail
        if tail == 3:
            h ^= rows[:, end + 2].astype(np.uint32) << np.uint32(16)
        if tail >= 2:
            h ^= rows[:, end + 1].astype(np.uint32) << np.uint32(8)
        h ^= rows[:, end]
        h *= m
    h ^= h >> np.uint32(13)
    h *= m
    h ^= h >> np.uint32(15)
    hashes: list[int] = h.tolist()
    return hashes


class Murmur2Partitioner:
    """aiokafka's `DefaultPartitioner` with the faster `murmur2`: a key goes to the same partition
    as with the Java client and aiokafka; a record without a key to a random available partition
    (`publish_many` and `publish` give those the topic's sticky partition instead)."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]

    def partitions(
        self,
        keys: Sequence[bytes | None],
        all_partitions: Sequence[int],
        available: Sequence[int],
    ) -> list[int]:
        """The partition of each of `keys`, as `__call__` chooses it one key at a time; the keys of
        one length hashed together (`murmur2_same_length`) where there are enough of them."""
        chosen = [0] * len(keys)
        by_length: dict[int, tuple[list[int], list[bytes]]] = {}
        for position, key in enumerate(keys):
            if key is None:
                chosen[position] = self(None, all_partitions, available)
                continue
            positions, same = by_length.setdefault(len(key), ([], []))
            positions.append(position)
            same.append(key)
        count = len(all_partitions)
        for positions, same in by_length.values():
            if len(same) >= _VECTOR_MIN_KEYS:
                hashes = murmur2_same_length(same)
            else:
                hashes = [murmur2(key) for key in same]
            for position, hashed in zip(positions, hashes, strict=True):
                chosen[position] = all_partitions[(hashed & 0x7FFFFFFF) % count]
        return chosen
