"""kafka:// partitioner: the faster murmur2 gives aiokafka's (and the Java client's) partitions."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

import messaging
from messaging.kafka import KafkaPubSub
from messaging.kafka._partitioner import Murmur2Partitioner, murmur2, murmur2_same_length


def _keys(count: int, seed: int = 17) -> list[bytes]:
    """Random keys of 0-69 bytes (every tail length), and request ids as the gateway makes them."""
    rng = random.Random(seed)
    keys = [rng.randbytes(rng.randrange(70)) for _ in range(count)]
    keys += [rng.randbytes(16).hex().encode() for _ in range(count)]
    return keys


def test_murmur2_equals_aiokafkas_on_every_key() -> None:
    """murmur2 returns aiokafka's hash for 10,000 random keys of 0-69 bytes and request ids."""
    mismatched = [key for key in _keys(5_000) if murmur2(key) != aiokafka_murmur2(key)]
    assert mismatched == []


def test_murmur2_of_keys_of_one_length_together_equals_aiokafkas() -> None:
    """murmur2_same_length returns aiokafka's hash for 50 random keys of each length 0-69."""
    rng = random.Random(5)
    for length in range(70):
        keys = [rng.randbytes(length) for _ in range(50)]
        assert murmur2_same_length(keys) == [aiokafka_murmur2(key) for key in keys], length


def test_a_batch_of_keys_goes_to_aiokafkas_partitions() -> None:
    """partitions() of mixed keys (lengths, repeats, no key) equals DefaultPartitioner per key."""
    rng = random.Random(9)
    keys: list[bytes | None] = _keys(400, seed=3) + [None] * 5
    keys += [rng.randbytes(16).hex().encode() for _ in range(40)] * 2
    rng.shuffle(keys)
    partitions = list(range(6))
    chosen = Murmur2Partitioner().partitions(keys, partitions, partitions)
    theirs = DefaultPartitioner()
    for key, partition in zip(keys, chosen, strict=True):
        if key is None:
            assert partition in partitions
        else:
            assert partition == theirs(key, partitions, partitions)


def test_murmur2_matches_the_java_clients_known_values() -> None:
    """murmur2 of the Java client's test strings gives the Java client's (unsigned) values."""
    # From the Java client's UtilsTest.testMurmur2, as unsigned 32-bit integers.
    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF
    assert murmur2(b"foobar") == -790332482 & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-long-string") == -985981536 & 0xFFFFFFFF
    assert murmur2(b"") == 275646681


def test_keyed_records_go_to_aiokafkas_partition() -> None:
    """A keyed record goes to the partition aiokafka's DefaultPartitioner picks, for 1-12 partitions."""
    ours, theirs = Murmur2Partitioner(), DefaultPartitioner()
    for count in range(1, 13):
        partitions = list(range(count))
        for key in _keys(300, seed=count):
            assert ours(key, partitions, partitions) == theirs(key, partitions, partitions)


def test_a_record_without_a_key_goes_to_an_available_partition() -> None:
    """Without a key, the partition is one of the available ones (all of them when none is)."""
    partitioner = Murmur2Partitioner()
    assert {partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert {partitioner(None, [0, 1], []) for _ in range(50)} <= {0, 1}


async def test_the_producer_uses_the_faster_partitioner() -> None:
    """KafkaPubSub's producer partitions with Murmur2Partitioner."""
    pubsub = messaging.connect("kafka://127.0.0.1:1")
    assert isinstance(pubsub, KafkaPubSub)
    producer = pubsub._new_producer()
    try:
        assert isinstance(producer._partitioner, Murmur2Partitioner)
    finally:
        await producer.stop()
