"""Client addresses behind reverse proxies: whose ``X-Forwarded-For`` to believe.

Anyone can send ``X-Forwarded-For``, so it is read only when the connection comes from a
proxy listed in ``LEITSTAND_TRUSTED_PROXIES``, and then from the right: the first address
that is not itself a trusted proxy is the client. Entries further left were written by
the client and prove nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_LIMIT = 4096


def parse_networks(raw: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 127.0.0.1"`` as networks; raises ValueError for a bad entry."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


class TrustedProxies:
    def __init__(self, networks: Sequence[Network]) -> None:
        self.networks = tuple(networks)
        self.trusts: Callable[[str], bool] = lru_cache(maxsize=_CACHE_LIMIT)(self._trusts)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def client(self, peer: str, forwarded_for: bytes | None) -> str:
        """The address to hold a request's client to."""
        if forwarded_for is None or not self.trusts(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.decode("latin-1").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return _valid(hop) or peer
        # Every hop is a proxy of ours: the leftmost one is where the request came in.
        return (_valid(hops[0]) or peer) if hops else peer


def _valid(address: str) -> str | None:
    """``address`` if it is an IP address; a forged header may hold anything else."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None
