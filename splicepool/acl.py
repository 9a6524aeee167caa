"""Access lists: which client addresses may connect, from lists of allowed and denied networks.

``AccessList(allow=[...], deny=[...])`` takes CIDR strings (``"10.0.0.0/8"``,
``"2001:db8::/32"``) or bare addresses (one host: ``"127.0.0.1"`` is ``127.0.0.1/32``).
``permits(ip)`` answers for one client address given as text, as ``getpeername()`` or a
PROXY protocol header gives it. The contract:

* ``deny`` wins over ``allow``: an address inside any denied network is refused.
* With no ``allow`` entries every address not denied may connect; with some, an address
  must be inside one of them.
* An empty list (``bool(acl)`` is False) permits everything; a server can skip the check.
* IPv4 clients seen through an IPv6 socket (``"::ffff:1.2.3.4"``) are checked as the IPv4
  address, so the IPv4 entries apply to them. An entry written in that IPv4-mapped form
  (``"::ffff:10.0.0.0/104"``) is stored as the IPv4 network it names (``10.0.0.0/8``).
  IPv6 entries never match IPv4 clients: ``"::/0"`` does not cover ``1.2.3.4``.
* A ``%scope`` suffix on an IPv6 client address (``"fe80::1%eth0"``) is ignored; entries
  must not have one.

Entries are strict: an entry with host bits set (``"10.0.0.1/8"``) is a ``ValueError``
saying so, as a likely typo, rather than silently meaning ``10.0.0.0/8``. Leading and
trailing blanks around an entry are ignored. Every error names the bad entry and the list
it was in, and no list is built. The checks are a linear scan over the entries of the
client's address family (a mask and a compare each): fast for tens of entries, linear for
thousands. Standard library only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["AccessList", "Network"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class AccessList:
    """Which client addresses may connect: ``deny`` wins over ``allow``; with no ``allow``
    entries every address not denied may connect.

    ``allow`` and ``deny`` are the parsed entries, as tuples of ``ipaddress`` networks in
    the order given. Entries with host bits set are refused (strict), see the module doc.
    """

    __slots__ = ("allow", "deny", "_allow4", "_allow6", "_deny4", "_deny6")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        """Build the list from CIDR strings; a ValueError names the first bad entry and its
        list, and a TypeError says when a list is not a list of strings."""
        self.allow: tuple[Network, ...] = _parse_list(allow, "allow")
        self.deny: tuple[Network, ...] = _parse_list(deny, "deny")
        self._allow4 = _masks(self.allow, 4)
        self._allow6 = _masks(self.allow, 6)
        self._deny4 = _masks(self.deny, 4)
        self._deny6 = _masks(self.deny, 6)

    def __bool__(self) -> bool:
        """False exactly when both lists are empty (every address is permitted)."""
        return bool(self.allow or self.deny)

    def permits(self, ip: str | _Address) -> bool:
        """True when the client address ``ip`` may connect: not inside a denied network,
        and inside an allowed one if there are any allowed networks.

        ``ip`` is text (``"10.1.2.3"``, ``"::1"``, ``"::ffff:10.1.2.3"``, ``"fe80::1%eth0"``)
        or an ``ipaddress`` address; text that is not an IP address is a ValueError.
        """
        addr = _parse_ip(ip)
        value = int(addr)
        if addr.version == 4:
            deny, allow = self._deny4, self._allow4
        else:
            deny, allow = self._deny6, self._allow6
        for net, mask in deny:
            if value & mask == net:
                return False
        if not self.allow:
            return True
        for net, mask in allow:
            if value & mask == net:
                return True
        return False

    def describe(self) -> str:
        """One line for logs: ``"allow 10.0.0.0/8, 127.0.0.0/8; deny 10.1.0.0/16"``; the
        allow part reads ``"allow all"`` when there are no allow entries, and the deny part
        is left out when there are no deny entries."""
        text = "allow " + (", ".join(map(str, self.allow)) if self.allow else "all")
        if self.deny:
            text += "; deny " + ", ".join(map(str, self.deny))
        return text

    def __repr__(self) -> str:
        allow = [str(n) for n in self.allow]
        deny = [str(n) for n in self.deny]
        return f"AccessList(allow={allow!r}, deny={deny!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccessList):
            return NotImplemented
        return self.allow == other.allow and self.deny == other.deny

    def __hash__(self) -> int:
        return hash((self.allow, self.deny))


def _parse_list(entries: Iterable[str], which: str) -> tuple[Network, ...]:
    if isinstance(entries, (str, bytes)):
        raise TypeError(f"{which} must be a list of entries, not one string: {entries!r}")
    try:
        items = list(entries)
    except TypeError:
        raise TypeError(f"{which} must be an iterable of strings, not {entries!r}") from None
    return tuple(_parse_entry(entry, which) for entry in items)


def _parse_entry(entry: str, which: str) -> Network:
    if not isinstance(entry, str):
        raise TypeError(f"{which} entry {entry!r} is not a string")
    text = entry.strip()
    if not text:
        raise ValueError(f"{which} entry {entry!r} is empty")
    if "%" in text:
        raise ValueError(f"{which} entry {entry!r} has a %scope, which entries must not have")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(
                f"{which} entry {entry!r} has host bits set (the network is {loose})"
            ) from None
        raise ValueError(
            f"{which} entry {entry!r} is not an IP address or CIDR network ({exc})"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None
        net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _masks(nets: tuple[Network, ...], version: int) -> tuple[tuple[int, int], ...]:
    return tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == version)


def _parse_ip(ip: str | _Address) -> _Address:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr: _Address = ip
    elif isinstance(ip, str):
        text = ip.partition("%")[0] if ":" in ip else ip
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{ip!r} is not an IP address") from None
    else:
        raise TypeError(f"the client address must be a string, not {ip!r}")
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
    return addr
