"""The Redis Cluster harness (tests/support/redis_cluster.py) is a real, usable cluster: keys
land on all three masters through coredis' cluster client, a script's SPUBLISH reaches a
sharded subscriber, and a killed master's slots come back on its promoted replica."""

from __future__ import annotations

import anyio
import coredis
import pytest

from .support.redis_cluster import RedisCluster, command, hash_slot

TIMEOUT = 10


def client(cluster: RedisCluster) -> coredis.RedisCluster[str]:
    """A cluster client on the first running node (it finds the others by ``CLUSTER SLOTS``).

    Not ``RedisCluster.from_url``: in coredis 6.9 that warns (DeprecationWarning, an error in
    this suite) about the startup node it builds itself; see the last test.
    """
    return coredis.RedisCluster("127.0.0.1", cluster.live_ports()[0], decode_responses=True)


def keys_per_master(cluster: RedisCluster, prefix: str) -> dict[int, str]:
    """A key for each master (by its port), found by trying ``<prefix>0``, ``<prefix>1``..."""
    keys: dict[int, str] = {}
    candidate = 0
    while len(keys) < len(cluster.masters()):
        key = f"{prefix}{candidate}"
        keys.setdefault(cluster.master_for_key(key).port, key)
        candidate += 1
    return keys


def test_topology_and_hash_slot(redis_cluster: RedisCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert all(len(node.replicas) == 1 for node in masters)
    assert sorted(
        [node.port for node in masters] + [r for node in masters for r in node.replicas]
    ) == sorted(redis_cluster.ports)
    for key in ["foo", "{user:1}:events", "a{}b", "x{y}z{w}", "", "123456789", "é{"]:
        assert hash_slot(key) == command(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", key), key


async def test_keys_land_on_every_master(redis_cluster: RedisCluster) -> None:
    keys = keys_per_master(redis_cluster, "harness:set:")
    async with client(redis_cluster) as redis:
        for port, key in keys.items():
            await redis.set(key, str(port))
            assert await redis.get(key) == str(port)
            assert command(port, "GET", key) == str(port)  # on that master itself
            await redis.delete([key])


async def test_script_spublish_reaches_a_sharded_subscriber(redis_cluster: RedisCluster) -> None:
    key, channel = "{harness:spublish}:key", "{harness:spublish}:channel"
    script = "return redis.call('SPUBLISH', ARGV[1], ARGV[2])"
    async with (
        client(redis_cluster) as redis,
        redis.sharded_pubsub(channels=[channel], ignore_subscribe_messages=True) as pubsub,
    ):
        assert await redis.eval(script, keys=[key], args=[channel, "hello"]) == 1
        with anyio.fail_after(TIMEOUT):
            message = await anext(aiter(pubsub))
    assert (message["channel"], message["data"]) == (channel, "hello")


async def test_failover_moves_the_slots_to_the_replica(own_redis_cluster: RedisCluster) -> None:
    cluster = own_redis_cluster
    keys = keys_per_master(cluster, "harness:failover:")
    victim = cluster.masters()[1]
    async with client(cluster) as redis:
        for port, key in keys.items():
            await redis.set(key, str(port))
        await anyio.to_thread.run_sync(cluster.wait_replicated)  # before the master dies
        assert command(victim.replicas[0], "DBSIZE") == 1
        await anyio.to_thread.run_sync(cluster.kill, victim.port)
        promoted = await anyio.to_thread.run_sync(cluster.wait_failover, victim.port)
        assert promoted.port == victim.replicas[0]
        assert promoted.slots == victim.slots
        assert cluster.master_for_key(keys[victim.port]).port == promoted.port
        with anyio.fail_after(TIMEOUT):
            # (coredis relearns the layout only after enough errors, so a command may still
            # go to the dead master for a while: have it relearn now, as RedisBackend does)
            await redis.connection_pool.cluster_layout.initialize()
            assert await redis.get(keys[victim.port]) == str(victim.port)
    async with client(cluster) as redis:
        for port, key in keys.items():
            assert await redis.get(key) == str(port)


async def test_from_url_works_but_warns(redis_cluster: RedisCluster) -> None:
    """coredis 6.9's ``RedisCluster.from_url`` passes its pool a startup node in the form the
    pool deprecates. When this fails, coredis has fixed it: ``client`` may use ``from_url``."""
    with pytest.warns(DeprecationWarning, match="TCPLocation"):
        redis = coredis.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    async with redis:
        assert await redis.ping() == "PONG"
