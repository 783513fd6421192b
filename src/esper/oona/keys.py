"""Every Redis key the bus uses, named in one place.

Standalone and Sentinel deployments use the plain v1 stream names
(``oona.normal`` ...), so esper-lite v1 peers interoperate. On Redis Cluster
every key carries one hash tag (``{esper}oona.normal``,
``{esper}oona:replay:...``): the commit script, dead-lettering and replay
keys touch several keys in one round trip, which Cluster only allows within
one hash slot. The trade-off is that the bus lives on one shard; its
throughput needs are far below one shard's capacity, and the catalogue and
artifacts, which are the large data, are not in Redis at all.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
#: The hash tag every bus key carries on Redis Cluster.
CLUSTER_HASH_TAG = "esper"


def hash_tag_for(url: str | None) -> str | None:
    """The key hash tag a deployment needs: one on Cluster, none elsewhere."""
    return CLUSTER_HASH_TAG if url is not None and url.startswith(f"{CLUSTER_SCHEME}://") else None


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Maps logical names (stream names as configured) to Redis keys."""

    hash_tag: str | None = None

    @property
    def prefix(self) -> str:
        return f"{{{self.hash_tag}}}" if self.hash_tag else ""

    def stream(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def logical(self, key: str) -> str:
        """The configured stream name of a stream key (inverse of :meth:`stream`)."""
        prefix = self.prefix
        return key[len(prefix) :] if prefix and key.startswith(prefix) else key

    def replay(self, scope: str, replay_key: str) -> str:
        """A replay-guard key: ``scope`` is a group name, or ``bcast:<instance>`` for a broadcast reader."""
        return f"{self.prefix}oona:replay:{scope}:{replay_key}"

    def instances(self, service: str) -> str:
        """The hash of leased consumer-name slots of one kind of service."""
        return f"{self.prefix}oona:instances:{service}"

    def gaps(self, stream: str) -> str:
        """The hash remembering which trimmed-unread entries of ``stream`` were already counted."""
        return f"{self.prefix}oona:gaps:{stream}"

    def probe(self, instance: str) -> str:
        """A short-lived key a readiness check writes to prove the server accepts writes."""
        return f"{self.prefix}oona:probe:{instance}"
