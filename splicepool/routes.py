"""Routes: who may connect to the proxy, what it reads first, and where each connection goes.

A ``Routes`` is built once from options (``--connect``, ``--balance``, ``--sni``, ``--allow``,
``--deny``, ``--max-conns-per-client``, ``--accept-proxy``, ``--send-proxy``, ...) and never
changed: a reload builds a new one, and ``ProxyServer.reload`` swaps it whole, so a new
connection sees either the old routes or the new ones, never a mix. Connections already
made keep the backend they were given.

The server asks it, per connection: ``reads_head`` (must it read a PROXY header or a
ClientHello before connecting?), ``acl.permits(ip)``, then ``order(ip, server_name)``: the
backends to try, in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .acl import AccessList
from .backends import BALANCES, Backend, BackendSet, format_hostport

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SEND_PROXY_VERSIONS = ("v1", "v2")
HEAD_TIMEOUT = 5.0  # seconds a client has to send its PROXY header and ClientHello (default)
PROXY_HEADER_MAX = 16 + 4096  # the largest PROXY v2 header accepted (TLVs included)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def sni_name(text: str) -> str:
    """A ``--sni`` server name made canonical (lowercase, no trailing dot), or ValueError.

    ``*.example.com`` matches one or more labels in front of ``example.com`` (not
    ``example.com`` itself), as a certificate's wildcard would match one of them."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    bare = name[2:] if name.startswith("*.") else name
    if not bare or len(name) > 253 or not set(bare) <= _NAME_CHARS or "*" in bare or ".." in bare:
        raise ValueError(f"{text!r} is not a server name (letters, digits, '-', '_', '.'; "
                         "or *.NAME for every name under NAME)")
    return name


#: The name of the one backend a SOCKS5 front door has: every target, counted together.
SOCKS_TARGETS = "SOCKS targets"


class SocksPolicy:
    """What a SOCKS5 front door checks: ``users`` (name -> password, both ``bytes``; empty:
    no authentication, RFC 1929 otherwise) and ``targets`` (an ``AccessList`` of the
    networks clients may connect to; None: anywhere but the proxy's own address)."""

    __slots__ = ("users", "targets")

    def __init__(self, users: dict[bytes, bytes] | None = None, allow_targets: Iterable[str] = (),
                 deny_targets: Iterable[str] = ()) -> None:
        self.users = dict(users or {})
        allow, deny = list(allow_targets), list(deny_targets)
        self.targets = AccessList(allow, deny) if allow or deny else None

    def describe(self) -> str:
        auth = f"{len(self.users)} user(s)" if self.users else "no authentication"
        where = f"targets: {self.targets.describe()}" if self.targets else "targets: anywhere"
        return f"SOCKS5, {auth}, {where}"


def _with_addresses(backend: Backend) -> str:
    """``localhost:8080 ([::1]:8080, 127.0.0.1:8080)``: the name, and the addresses it
    resolved to when they are not just the name itself."""
    texts = [format_hostport(a[4][0], a[4][1]) for a in backend.addresses]
    if texts == [backend.name]:
        return backend.name
    return f"{backend.name} ({', '.join(texts) or 'no addresses'})"


class Routes:
    """Where new connections go and who may make them: immutable once built.

    ``connect``: the default backends as ``(host, port)`` pairs (names are resolved here:
    ``OSError`` if one does not resolve). ``sni``: ``(server name, (host, port))`` pairs;
    a ClientHello naming one goes to its backend (a name given with several: to those, by
    ``balance``), any other to ``connect``. ``reuse``: the
    routes this replaces; a backend with the same ``HOST:PORT`` is the same object (its
    state, counters and live connections carry over) instead of a new one; its name is
    resolved again too, and its addresses replaced once everything else here passed.
    """

    __slots__ = ("default", "sni", "wild", "acl", "max_per_client", "accept_proxy", "proxy_from",
                 "send_proxy", "head_timeout", "health_check", "rise", "fall", "resolve_every",
                 "backends", "routes_by_name", "reads_head", "admits", "socks")

    def __init__(
        self,
        connect: Sequence[tuple[str, int]],
        *,
        balance: str = "roundrobin",
        sni: Iterable[tuple[str, tuple[str, int]]] = (),
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        max_per_client: int = 0,
        accept_proxy: bool = False,
        proxy_from: Iterable[str] = (),
        send_proxy: str | None = None,
        head_timeout: float = HEAD_TIMEOUT,
        health_check: float = 0.0,
        rise: int = 2,
        fall: int = 3,
        resolve_every: float = 0.0,
        socks: SocksPolicy | None = None,
        reuse: Routes | None = None,
    ) -> None:
        if socks is not None:
            if connect or sni or send_proxy or health_check or resolve_every:
                raise ValueError("a SOCKS5 front door connects where each client asks: it takes no "
                                 "connect, sni, send_proxy, health_check or resolve_every")
        elif not connect:
            raise ValueError("no backend: give at least one HOST:PORT to connect to")
        if balance not in BALANCES:
            raise ValueError(f"balance {balance!r}: expected one of {', '.join(BALANCES)}")
        proxy_from = list(proxy_from)
        if proxy_from and not accept_proxy:
            raise ValueError("proxy_from (--proxy-from) needs accept_proxy (--accept-proxy)")
        if send_proxy not in (None, *SEND_PROXY_VERSIONS):
            raise ValueError(f"send_proxy {send_proxy!r}: expected v1, v2 or None")
        if max_per_client < 0:
            raise ValueError(f"max_per_client {max_per_client}: expected 0 (no limit) or more")
        if not head_timeout > 0:
            raise ValueError(f"head_timeout {head_timeout!r}: expected a positive number of seconds")
        if health_check < 0 or resolve_every < 0 or rise < 1 or fall < 1:
            raise ValueError("health_check and resolve_every must be 0 (off) or more; rise and fall 1 or more")
        old = {b.name: b for b in reuse.backends} if reuse is not None else {}
        made: dict[str, Backend] = {}
        resolved: list[tuple[Backend, tuple[tuple[Any, ...], ...]]] = []  # kept ones, resolved again

        def backend(host: str, port: int) -> Backend:
            name = format_hostport(host, port)
            if name not in made:
                try:
                    fresh = Backend(host, port)  # resolves now
                except OSError as exc:
                    error = OSError(f"backend {name}: {exc.strerror or exc}")
                    error.errno = exc.errno  # kept, but out of the message
                    raise error from None
                kept = old.get(name)
                if kept is None:
                    kept = fresh
                else:
                    resolved.append((kept, fresh.addresses))
                made[name] = kept
            return made[name]

        defaults: list[Backend] = []
        for host, port in connect:
            if format_hostport(host, port) in made:
                raise ValueError(f"backend {format_hostport(host, port)} is given twice")
            defaults.append(backend(host, port))
        if socks is not None:  # one backend stands for every target: its counters are theirs
            targets = old.get(SOCKS_TARGETS)
            if targets is None:
                targets = Backend("socks", 1, resolve=False)
                targets.name = SOCKS_TARGETS
            made[SOCKS_TARGETS] = targets
            defaults.append(targets)
        self.default = BackendSet(defaults, balance)
        by_name: dict[str, list[Backend]] = {}  # a name given again: one more backend for it
        for name, (host, port) in sni:
            key = sni_name(name)
            target = backend(host, port)
            listed = by_name.setdefault(key, [])
            if target in listed:
                raise ValueError(f"server name {key} is routed to {target.name} twice")
            listed.append(target)
        exact: dict[str, BackendSet] = {}
        wild: list[tuple[str, BackendSet]] = []
        for key, targets in by_name.items():
            spread = BackendSet(targets, balance)  # several: spread as --connect's are
            if key.startswith("*."):
                wild.append((key[1:], spread))  # ".example.com": a suffix match
            else:
                exact[key] = spread
        wild.sort(key=lambda item: -len(item[0]))  # the longest suffix wins
        self.sni = exact
        self.wild = tuple(wild)
        self.acl = AccessList(allow, deny)
        self.max_per_client = max_per_client
        self.accept_proxy = accept_proxy
        #: The peers that may send a PROXY header (checked on the socket's own address,
        #: before anything is read); empty: any peer.
        self.proxy_from = AccessList(proxy_from, ())
        self.send_proxy = send_proxy
        self.head_timeout = head_timeout
        self.health_check = health_check
        self.rise = rise
        self.fall = fall
        self.resolve_every = resolve_every
        self.backends: tuple[Backend, ...] = tuple(made.values())
        for kept, addresses in resolved:  # as the Resolver does: the same set, in any order, stays
            if {(a[0], a[4]) for a in addresses} != {(a[0], a[4]) for a in kept.addresses}:
                kept.addresses = addresses
        #: Whether the names of --sni routes are needed (a ClientHello to read and parse).
        self.routes_by_name = bool(exact) or bool(wild)
        #: Whether a connection must be read from before it is connected: a PROXY header
        #: to take off, or a ClientHello to route by.
        self.reads_head = accept_proxy or self.routes_by_name or socks is not None
        #: Whether a connection needs more than the default balance's order before it
        #: connects: an access list or per-client limit to check, a PROXY header to send.
        self.admits = bool(self.acl) or max_per_client > 0 or send_proxy is not None
        #: A SOCKS5 front door's policy (users, targets), or None for a proxy to backends.
        self.socks = socks

    def order(self, client_ip: str | None, server_name: str | None = None) -> list[Backend]:
        """The backends one new connection should try, in order; [] when none is up.

        A ``server_name`` routed by ``--sni`` goes to its own backends only; any other
        name, or none, goes to the default backends; each set by the balance."""
        if server_name is not None and (self.sni or self.wild):
            target = self.sni.get(server_name)
            if target is None:
                for suffix, candidate in self.wild:
                    if server_name.endswith(suffix):
                        target = candidate
                        break
            if target is not None:
                return target.order(client_ip)
        return self.default.order(client_ip)

    def describe(self) -> str:
        """One line for the start-up and reload log lines."""
        if self.socks is not None:
            return self.socks.describe()
        names = [_with_addresses(b) for b in self.default.backends]
        text = ", ".join(names)
        if len(names) > 1:
            text += f" ({self.default.balance})"
        routed = self._routed()
        if routed:
            text += "; by server name: " + ", ".join(f"{k} -> {', '.join(v)}" for k, v in routed.items())
        return text

    def _routed(self) -> dict[str, list[str]]:
        """Each --sni name (``*.DOMAIN`` for a wildcard) and the names of its backends."""
        named = [*self.sni.items(), *(("*" + suffix, spread) for suffix, spread in self.wild)]
        return {key: [b.name for b in spread.backends] for key, spread in named}

    def options(self) -> dict[str, Any]:
        """The settings as a dict (for /stats)."""
        return {
            "balance": self.default.balance,
            "backends": [b.name for b in self.default.backends],
            "sni": self._routed(),
            "access": self.acl.describe() if self.acl else "",
            "max_conns_per_client": self.max_per_client,
            "accept_proxy": self.accept_proxy,
            "proxy_from": self.proxy_from.describe() if self.proxy_from else "",
            "send_proxy": self.send_proxy,
            "health_check": self.health_check,
            "resolve_every": self.resolve_every,
            "socks": self.socks.describe() if self.socks is not None else "",
        }
