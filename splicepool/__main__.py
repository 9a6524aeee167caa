"""``python -m splicepool proxy``: a TCP proxy whose bytes are moved by the splice pool."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
import time

from ._log import log_to_stderr
from .acl import AccessList
from .backends import BALANCES, lookup_host
from .pool import SplicePool
from .routes import HEAD_TIMEOUT, Routes, SocksPolicy, sni_name
from .server import (
    WILDCARDS,
    ProxyServer,
    format_addr,
    loops_back,
    parse_hostport,
)

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

EPILOG = """\
examples:
  # forward local port 8080 to a web server on 127.0.0.1:8000
  python -m splicepool proxy --listen 127.0.0.1:8080 --connect 127.0.0.1:8000

  # IPv6, idle connections closed after 5 minutes, live stats on 127.0.0.1:9100
  python -m splicepool proxy --listen [::1]:8080 --connect [::1]:8000 \\
      --idle 300 --stats-listen 9100

  # two processes on one port (SO_REUSEPORT), at most 5000 connections each,
  # on every interface (said so in a warning line at start)
  python -m splicepool proxy --listen 0.0.0.0:8080 --connect 10.0.0.2:80 \\
      --processes 2 --max-conns 5000

  # three backends, the least busy first, checked every 2 s; names resolved
  # again every 30 s
  python -m splicepool proxy --listen 0.0.0.0:5432 --balance leastconn \\
      --connect db1:5432 --connect db2:5432 --connect db3:5432 \\
      --health-check 2 --rise 2 --fall 3 --resolve-every 30

  # behind HAProxy (send-proxy-v2): take the PROXY header, only from HAProxy's
  # address; pass the client's address on to a backend that reads PROXY v1
  python -m splicepool proxy --listen 10.0.0.31:7000 --accept-proxy \\
      --proxy-from 10.0.0.5/32 --connect 10.0.0.11:25 --send-proxy v1

  # TLS passthrough by server name; other names, and plain text, to :8443
  python -m splicepool proxy --listen 0.0.0.0:443 --connect 127.0.0.1:8443 \\
      --sni api.example.com=10.0.0.21:443 --sni '*.apps.example.com=10.0.0.22:443'

  # keep a network out, at most 20 connections per client address
  python -m splicepool proxy --listen 0.0.0.0:8080 --connect 127.0.0.1:8000 \\
      --deny 192.0.2.0/24 --max-conns-per-client 20

  # everything from a file (keys: the long option names); SIGHUP re-reads it
  python -m splicepool proxy --config /etc/splicepool/web.toml
  #   listen = "0.0.0.0:443"
  #   connect = ["10.0.0.11:443", "10.0.0.12:443"]
  #   health-check = 2

Each finished connection logs one line: peer, bytes up (client to upstream)
and down, duration and end reason (EOF, IDLE, ERROR, UNSPLICED, POOL_CLOSED).
up= counts bytes written to the upstream's socket buffer, down= counts bytes
written to the client's socket buffer, not bytes the client has received: the
kernel may still hold some when a connection ends. A client closed before it
is proxied (--allow/--deny, a limit, a bad PROXY header or ClientHello, no
backend up) logs why, and /stats and /metrics count it by reason.

Each connection tries its backends in the --balance order, each backend's
addresses in the resolver's order, --connect-timeout for each, until one
connects; names are resolved at start, on each reload and every
--resolve-every seconds. A backend that health checks mark down gets no new
connection; with every backend down a client is closed at once. --listen
needs a host: 0.0.0.0:PORT or [::]:PORT listens on every interface.
Timeouts may be inf (never). --connect may not be --listen itself.

SIGINT or SIGTERM stops accepting, lets live connections finish for --grace
seconds, closes the rest and exits with status 0. SIGHUP re-reads --config
and the command line: backends, balance, --sni, --allow/--deny, limits,
PROXY protocol, checks, --idle, --connect-timeout, --max-conns and
--log-level change for new connections; live ones keep their backend; a bad
file changes nothing (an error line); an option that needs a restart
(--listen, --workers, --processes, ...) gets a warning line. Without
--config, SIGHUP is logged and ignored; SIGUSR1 always is. With
--processes, the parent forwards SIGINT/SIGTERM/SIGHUP to the children and
replaces a child that dies (after 0.1 s, doubling up to 5 s while they keep
dying within 10 s of starting). More: docs/proxy-tier.md.
"""

SOCKS_EPILOG = """\
examples:
  # a SOCKS5 proxy for this machine only, to anywhere (a warning line says so)
  python -m splicepool socks --listen 127.0.0.1:1080
  curl --socks5-hostname 127.0.0.1:1080 https://example.com/

  # with users, to the 10.0.0.0/8 network only, stats on 127.0.0.1:9101
  python -m splicepool socks --listen 0.0.0.0:1080 --user alice:s3cret \\
      --allow-target 10.0.0.0/8 --stats-listen 9101
  curl --socks5 alice:s3cret@127.0.0.1:1080 http://10.0.0.7/

CONNECT only (BIND and UDP ASSOCIATE get reply 0x07). Replies: 0x05 when the
target refuses, 0x04 when it is unreachable, times out (--connect-timeout)
or its name does not resolve, 0x02 when --allow-target/--deny-target (or the
proxy's own address) forbid it. Target names are resolved in background
threads, never in the accept loop. Each finished connection logs one line, as
the proxy command does; USER@ comes before the client's address. SIGHUP
re-reads --config (users and target lists too); more: docs/socks.md.
"""

HTTP_EPILOG = """\
examples:
  # a reverse proxy for a web server on 127.0.0.1:8000
  python -m splicepool http --listen 0.0.0.0:8080 --connect 127.0.0.1:8000

  # three backends, the least busy first, checked every 2 s, behind a TLS
  # terminator (X-Forwarded-Proto: https), stats on 127.0.0.1:9102
  python -m splicepool http --listen 127.0.0.1:8080 --balance leastconn \\
      --connect 10.0.0.11:80 --connect 10.0.0.12:80 --connect 10.0.0.13:80 \\
      --health-check 2 --forwarded-proto https --stats-listen 9102

Request and response heads are parsed (h11: pip install 'splicepool[http]')
and rewritten: hop-by-hop fields dropped, X-Forwarded-For, Forwarded and
X-Forwarded-Proto added. Bodies are spliced: a Content-Length body with max
set to its length, a chunked one chunk by chunk. Keep-alive on both sides; an
idle backend connection serves the next client. A malformed request gets 400
(431 for a head over 64 KiB), CONNECT 405, a backend that cannot be reached
502, every backend down 503, a response that does not start within
--response-timeout 504. After a 101 (WebSocket) the two sockets are relayed
both ways. Each request logs one line: client, backend, request line,
status, bytes up and down, duration. More: docs/http.md.
"""

_INF = float("inf")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not zero or more seconds")
    return value


def _listen_addr(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: no host; write 127.0.0.1:{port} (this host only), "
            f"or [::]:{port} or 0.0.0.0:{port} to listen on every interface"
        )
    return host, port


def _connect_addr(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r}: no host")
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: port 0 is not a port to connect to")
    return host, port


def _stats_addr(text: str) -> tuple[str, int]:
    try:  # PORT and :PORT both mean 127.0.0.1:PORT, as --help says
        return parse_hostport(text, default_host="127.0.0.1")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class ConfigError(ValueError):
    """The options (from the command line and the --config file) are wrong; the message says how."""


def _columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` says it ($COLUMNS, else stdout's
    terminal, else 80), without importing shutil."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def _sized(formatter_class: Any) -> Any:
    """``formatter_class`` given its width: argparse's own formatter, given none, imports
    shutil for it (and shutil zlib, bz2 and lzma: ~1 MiB of RSS), and argparse makes one per
    add_argument (to check the metavar), so every proxy process would carry them."""

    def make(prog: str) -> Any:
        return formatter_class(prog, width=_columns() - 2)

    return make


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of exiting, when ``raising``
    (a reload must never end the proxy over a bad file), and that never imports shutil."""

    def __init__(self, *args: Any, raising: bool = False, **kwargs: Any) -> None:
        kwargs["formatter_class"] = _sized(kwargs.get("formatter_class", argparse.HelpFormatter))
        super().__init__(*args, **kwargs)
        self.raising = raising

    def error(self, message: str) -> Any:
        if self.raising:
            raise ConfigError(message)
        return super().error(message)


class _Once(argparse.Action):
    """An option that may be given only once (a second --listen would silently win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: one {option_string} per proxy (run one "
                         "proxy per listening address, or several processes with --processes)")
        setattr(namespace, self.dest, values)


def _sni_route(text: str) -> tuple[str, tuple[str, int]]:
    name, sep, target = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=HOST:PORT")
    try:
        name = sni_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, _connect_addr(target)


def _cidr(which: str, kind: str = "allow") -> Any:
    """A parser of one network entry: checked as an AccessList's ``kind`` ("allow" or
    "deny") entry, its error naming it ``which`` ("allow", "target", ...)."""

    def parse(text: str) -> str:
        try:
            AccessList(**{kind: [text]})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"{kind} entry", f"{which} entry", 1)) from None
        return text

    return parse


def _user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name or not password:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:PASSWORD, neither empty")
    if len(name.encode()) > 255 or len(password.encode()) > 255:
        raise argparse.ArgumentTypeError(f"{name!r}: a name and a password are at most 255 bytes each")
    return name, password


def _prog() -> str:
    return "splicepool" if os.path.basename(sys.argv[0]) == "splicepool" else "python -m splicepool"


# The long options of `proxy`, as a --config file names them, by kind.
FLAG_OPTIONS = {"accept-proxy", "bind-cpus", "reuse-port", "loop-thread"}  # true or false
BOOLEAN_OPTIONS = {"nodelay"}  # true or false: --nodelay / --no-nodelay
LIST_OPTIONS = {"connect", "sni", "allow", "deny", "proxy-from", "user", "allow-target", "deny-target"}  # may repeat: a list
VALUE_OPTIONS = {
    "listen", "balance", "workers", "idle", "max-conns", "max-conns-per-client", "connect-timeout",
    "pipe-size", "processes", "grace", "stats-listen", "log-level", "health-check", "rise", "fall",
    "resolve-every", "send-proxy", "head-timeout", "keepalive-timeout", "response-timeout",
    "forwarded-proto", "max-idle-upstream", "upstream-idle-timeout",
}
# What a reload applies; every other option takes effect on a restart (a reload says so).
RELOADABLE = {"connect", "sni", "allow", "deny", "balance", "max-conns-per-client", "accept-proxy",
              "proxy-from", "user", "allow-target", "deny-target", "send-proxy", "head-timeout", "health-check", "rise", "fall", "resolve-every", "idle",
              "connect-timeout", "max-conns", "log-level", "config"}


def build_parser(*, defaults: bool = True, raising: bool = False) -> argparse.ArgumentParser:
    """The command line's parser. ``defaults=False``: an option not given is absent from the
    namespace (how the options given on the command line are told from the file's)."""

    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser = _Parser(prog=_prog(), description=__doc__, raising=raising)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "proxy",
        help="run a TCP proxy",
        description="Accept TCP connections on --listen, connect each to a --connect backend, "
        "and splice the two sockets together in both directions (zero-copy on Linux).",
        epilog=EPILOG.replace("python -m splicepool", _prog()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --connect in socks must not mean --connect-timeout
        raising=raising,
    )
    parser.proxy_parser = p  # type: ignore[attr-defined]  # for errors found after parsing
    _add_listen(p, d)
    _add_backends(p, d)
    _add_accept_proxy(p, d)
    p.add_argument("--send-proxy", choices=("v1", "v2"), default=d(None),
                   help="send a PROXY protocol header of this version to the backend before any "
                   "byte of the client")
    p.add_argument("--sni", action="append", type=_sni_route, default=d(None),
                   metavar="NAME=HOST:PORT",
                   help="TLS passthrough: a client whose ClientHello names NAME (or, with "
                   "*.DOMAIN, a name under DOMAIN) goes to HOST:PORT; others to --connect; a "
                   "NAME given again adds a backend for it, spread by --balance")
    _add_common(p, d)
    s = sub.add_parser(
        "socks",
        help="run a SOCKS5 proxy",
        description="A SOCKS5 server (RFC 1928, CONNECT; RFC 1929 user names and passwords): "
        "each client names its target, and the two sockets are spliced together in both "
        "directions (zero-copy on Linux).",
        epilog=SOCKS_EPILOG.replace("python -m splicepool", _prog()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --connect in socks must not mean --connect-timeout
        raising=raising,
    )
    parser.socks_parser = s  # type: ignore[attr-defined]
    _add_listen(s, d)
    s.add_argument("--user", action="append", type=_user, default=d(None), metavar="NAME:PASSWORD",
                   help="a user who may connect (repeatable; RFC 1929); with none, no "
                   "authentication (prefer a --config file: a command line is visible to ps)")
    s.add_argument("--allow-target", action="append", type=_cidr("target"), default=d(None),
                   metavar="CIDR", help="clients may connect only to these networks "
                   "(repeatable; default: anywhere, said in a warning line)")
    s.add_argument("--deny-target", action="append", type=_cidr("target", "deny"), default=d(None),
                   metavar="CIDR", help="clients may not connect to these networks (repeatable; "
                   "wins over --allow-target)")
    _add_accept_proxy(s, d)
    _add_common(s, d)
    h = sub.add_parser(
        "http",
        help="run an HTTP/1.1 reverse proxy",
        description="An HTTP/1.1 reverse proxy: request and response heads are read and "
        "rewritten in Python, bodies are spliced (zero-copy on Linux); keep-alive on both "
        "sides, WebSocket upgrades.",
        epilog=HTTP_EPILOG.replace("python -m splicepool", _prog()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        raising=raising,
    )
    parser.http_parser = h  # type: ignore[attr-defined]
    _add_listen(h, d)
    _add_backends(h, d)
    _add_accept_proxy(h, d)
    h.add_argument("--keepalive-timeout", type=_positive_float, default=d(60.0), metavar="SECONDS",
                   help="how long a client connection may wait between requests (default: 60)")
    h.add_argument("--response-timeout", type=_positive_float, default=d(60.0), metavar="SECONDS",
                   help="how long a backend has to start its response once the request is sent "
                   "(then 504; default: 60)")
    h.add_argument("--forwarded-proto", default=d("http"), choices=("http", "https"),
                   help="the X-Forwarded-Proto and Forwarded proto= sent to the backends "
                   "(https behind a TLS terminator; default: http)")
    h.add_argument("--max-idle-upstream", type=_count(0), default=d(32), metavar="N",
                   help="idle keep-alive connections kept per backend for the next client "
                   "(default: 32)")
    h.add_argument("--upstream-idle-timeout", type=_positive_float, default=d(4.0), metavar="SECONDS",
                   help="a backend connection idle this long is closed, not used again: keep it "
                   "below the backends' own keep-alive timeout (default: 4)")
    _add_common(h, d)
    return parser


def _add_backends(p: argparse.ArgumentParser, d: Any) -> None:
    p.add_argument("--connect", action="append", type=_connect_addr, default=d(None),
                   metavar="HOST:PORT",
                   help="a backend (required; repeat it for several): every address its name "
                   "resolves to is tried, in order")
    p.add_argument("--balance", choices=BALANCES, default=d("roundrobin"),
                   help="how new connections are spread over the --connect backends: in turn, "
                   "to the one with the fewest live connections, or by client address "
                   "(default: roundrobin)")
    p.add_argument("--health-check", type=_seconds, default=d(0.0), metavar="SECONDS",
                   help="connect to each backend this often; a backend that is down gets no new "
                   "connection (default: 0, off)")
    p.add_argument("--rise", type=_count(1), default=d(2), metavar="N",
                   help="checks in a row that mark a down backend up (default: 2)")
    p.add_argument("--fall", type=_count(1), default=d(3), metavar="N",
                   help="checks in a row that mark an up backend down (default: 3)")
    p.add_argument("--resolve-every", type=_seconds, default=d(0.0), metavar="SECONDS",
                   help="resolve the backends' names again this often, so a DNS change reaches "
                   "new connections (default: 0, only at start and on reload)")


def _add_listen(p: argparse.ArgumentParser, d: Any) -> None:
    p.add_argument("--listen", action=_Once, type=_listen_addr, default=d(None), metavar="HOST:PORT",
                   help="address to accept on (required, once); IPv6 in brackets, as [::1]:8080; "
                   "0.0.0.0:PORT or [::]:PORT for every interface")


def _add_accept_proxy(p: argparse.ArgumentParser, d: Any) -> None:
    p.add_argument("--accept-proxy", action="store_true", default=d(False),
                   help="clients speak the PROXY protocol (v1 or v2): read the header first, and "
                   "log, check and balance by the address it carries")
    p.add_argument("--proxy-from", action="append", type=_cidr("--proxy-from"), default=d(None), metavar="CIDR",
                   help="with --accept-proxy: only peers in these networks may send a PROXY "
                   "header (repeatable; the load balancers' addresses); others are closed "
                   "unread (default: any peer)")


def _add_common(p: argparse.ArgumentParser, d: Any) -> None:
    """The options every front door has: head time, client lists and limits, the file,
    the pool, the process and the stats."""
    p.add_argument("--head-timeout", type=_positive_float, default=d(HEAD_TIMEOUT),
                   metavar="SECONDS",
                   help="how long a client has to send what is read before connecting: its "
                   "PROXY header (--accept-proxy), ClientHello (--sni), SOCKS5 request or "
                   "HTTP request head (from its first byte) "
                   f"(default: {HEAD_TIMEOUT:g})")
    p.add_argument("--allow", action="append", type=_cidr("allow"), default=d(None), metavar="CIDR",
                   help="only clients in these networks may connect (repeatable; IPv4 and IPv6)")
    p.add_argument("--deny", action="append", type=_cidr("deny", "deny"), default=d(None), metavar="CIDR",
                   help="clients in these networks may not connect (repeatable; wins over --allow)")
    p.add_argument("--max-conns-per-client", type=_count(0), default=d(0), metavar="N",
                   help="at most N live connections per client address; more are closed at once "
                   "(default: 0, no limit)")
    p.add_argument("--config", default=d(None), metavar="FILE.toml",
                   help="read options from a TOML file (keys: the long option names; a list "
                   "where an option repeats); the command line wins; SIGHUP re-reads it")
    p.add_argument("--workers", type=_count(1), default=d(None), metavar="N",
                   help="splice worker threads per process (default: one per CPU)")
    p.add_argument("--idle", type=_positive_float, default=d(None), metavar="SECONDS",
                   help="close a connection after this long with no byte moved either way "
                   "(default and inf: never)")
    p.add_argument("--max-conns", type=_count(0), default=d(0), metavar="N",
                   help="at most N live connections per process; more wait in the listen "
                   "backlog (default: 0, no limit)")
    p.add_argument("--connect-timeout", type=_positive_float, default=d(10.0), metavar="SECONDS",
                   help="give up on a backend address after this long, then try the next "
                   "one (default: 10; inf: never)")
    p.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=d(True),
                   help="set TCP_NODELAY on both legs (default: on)")
    p.add_argument("--pipe-size", type=_count(4096), default=d(1 << 20), metavar="BYTES",
                   help="pipe size per splice in flight, F_SETPIPE_SZ (default: 1048576)")
    p.add_argument("--bind-cpus", action="store_true", default=d(False),
                   help="bind worker thread i to the i-th CPU this process may use "
                   "(see docs/performance.md)")
    p.add_argument("--loop-thread", action="store_true", default=d(False),
                   help="proxy, socks: run the accept loop in a thread of its own (default: on "
                   "the first worker thread, which then also logs; one thread less to hand "
                   "each connection over to; http's loop always has its own)")
    p.add_argument("--reuse-port", action="store_true", default=d(False),
                   help="set SO_REUSEPORT on the listening socket")
    p.add_argument("--processes", type=_count(1), default=d(1), metavar="N",
                   help="run N processes on the same port with SO_REUSEPORT (default: 1); "
                   "with --stats-listen, process i serves stats on PORT+i; a child that dies "
                   "is replaced")
    p.add_argument("--grace", type=_seconds, default=d(10.0), metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long live connections may finish "
                   "(default: 10; inf: until they end)")
    p.add_argument("--stats-listen", type=_stats_addr, default=d(None), metavar="[HOST:]PORT",
                   help="serve /stats (JSON) and /metrics (Prometheus) over HTTP; "
                   "host defaults to 127.0.0.1 (default: off); at most 8 connections at "
                   "once, 5 s and an 8 KiB request head each")
    p.add_argument("--log-level", default=d("info"),
                   choices=["debug", "info", "warning", "error"],
                   help="logging level (default: info)")


def config_argv(path: str) -> list[list[str]]:
    """The options a --config TOML file gives, as command-line words (one list per option
    given); ConfigError naming the file and what is wrong in it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same module, from PyPI (the "config" extra)
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"--config {path}: reading TOML needs Python 3.11 or later, or "
                              "tomli (pip install 'splicepool[config]')") from None
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    words: list[list[str]] = []
    for key, value in data.items():
        name = key.replace("_", "-")
        option = "--" + name
        where = f"--config {path}: {key}"
        if name in LIST_OPTIONS:
            values = value if isinstance(value, list) else [value]
        elif isinstance(value, list):
            raise ConfigError(f"{where}: a list, but {option} takes one value")
        else:
            values = [value]
        for item in values:
            if name in FLAG_OPTIONS or name in BOOLEAN_OPTIONS:
                if not isinstance(item, bool):
                    raise ConfigError(f"{where}: expected true or false, not {item!r}")
                if item:
                    words.append([option])
                elif name in BOOLEAN_OPTIONS:
                    words.append(["--no-" + name])
            elif name in VALUE_OPTIONS or name in LIST_OPTIONS:
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise ConfigError(f"{where}: expected a string or a number, not {item!r}")
                words.append([option, str(item)])
            else:
                raise ConfigError(f"{where}: not an option of proxy (see --help; a file may not "
                                  "name another --config)")
    return words


def load_args(argv: list[str] | None, *, raising: bool = False) -> argparse.Namespace:
    """The options from ``argv`` and the --config file it names (the command line wins; a
    list option given there replaces the file's list). Exits with usage, or with
    ``raising``, raises ConfigError, on any problem."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(raising=raising)
    args = parser.parse_args(argv)
    if args.command not in ("proxy", "socks", "http"):
        return args
    # errors from here on are the command's own
    parser = getattr(parser, f"{args.command}_parser")
    if args.config is not None:
        try:
            words = config_argv(args.config)
        except ConfigError as exc:
            parser.error(str(exc))
        given = vars(build_parser(defaults=False, raising=raising).parse_args(argv))
        chunks = [chunk for chunk in words if _dest(chunk[0]) not in given]
        check = build_parser(defaults=False, raising=True)
        for chunk in chunks:  # a bad value is the file's: say so, not "argument --idle: ..."
            try:
                check.parse_args([args.command, *chunk])
            except ConfigError as exc:
                why = str(exc).removeprefix(f"argument {chunk[0]}: ")
                parser.error(f"--config {args.config}: {chunk[0][2:]}: {why}")
        args = build_parser(raising=raising).parse_args(argv + [w for chunk in chunks for w in chunk])
    for name in ("listen",) if args.command == "socks" else ("listen", "connect"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (on the command line or in the --config file)")
    return args


def _dest(option: str) -> str:
    name = option[2:]
    if name.startswith("no-"):
        name = name[3:]
    return name.replace("-", "_")


def build_routes(args: argparse.Namespace, reuse: Routes | None = None) -> Routes:
    """The routes the options describe; OSError when a backend's name does not resolve."""
    clients = {  # who may connect, and how: the same for every front door
        "allow": args.allow or (),
        "deny": args.deny or (),
        "max_per_client": args.max_conns_per_client,
        "accept_proxy": args.accept_proxy,
        "proxy_from": args.proxy_from or (),
        "head_timeout": args.head_timeout,
        "reuse": reuse,
    }
    if args.command == "socks":
        users = {name.encode(): password.encode() for name, password in args.user or ()}
        return Routes([], socks=SocksPolicy(users, args.allow_target or (), args.deny_target or ()), **clients)
    return Routes(
        args.connect,
        balance=args.balance,
        sni=getattr(args, "sni", None) or (),  # http has neither
        send_proxy=getattr(args, "send_proxy", None),
        health_check=args.health_check,
        rise=args.rise,
        fall=args.fall,
        resolve_every=args.resolve_every,
        **clients,
    )


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


_IGNORED = {signal.SIGUSR1: "SIGUSR1"}


def _ignored_line(signum: int) -> str:
    return f"{_IGNORED[signum]} received: ignored"


def make_reloader(argv: list[str] | None, running: argparse.Namespace) -> Any:
    """What SIGHUP runs (in a thread of the server's): read the options again, as at start,
    and make new routes from them; ConfigError or OSError keeps the running ones."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def reload(routes: Routes) -> tuple[Routes, dict[str, Any]]:
        args = load_args(argv, raising=True)
        log = logging.getLogger("splicepool.proxy")
        for key, value in sorted(vars(args).items()):
            name = key.replace("_", "-")
            if name not in RELOADABLE and name != "command" and value != getattr(running, key, None):
                log.warning("reload: --%s changed; it takes effect when the proxy is restarted", name)
        new = build_routes(args, reuse=routes)
        settings = {
            "idle": None if args.idle == _INF else args.idle,
            "connect_timeout": args.connect_timeout,
            "max_conns": args.max_conns,
            # set by the loop if it takes these routes: a refused reload changes nothing
            "log_level": getattr(logging, args.log_level.upper()),
        }
        return new, settings

    return reload


def _warn_wildcard(what: str, address: tuple[Any, ...], why: str) -> None:
    if address[0] in WILDCARDS:
        logging.getLogger("splicepool.proxy").warning(
            "%s on every interface (%s): %s", what, format_addr(address), why
        )


def run_proxy(args: argparse.Namespace, index: int = 0, argv: list[str] | None = None) -> int:
    """One proxy process: serve until SIGINT/SIGTERM, then wind down; exit status.

    1 if it cannot listen or serve stats, 2 if --connect is its own listening address; the
    error is then the last line logged."""
    log = logging.getLogger("splicepool.proxy")
    stats = None
    if args.stats_listen is not None:  # bound first: a port in use fails before anything starts
        host, port = args.stats_listen
        try:
            from ._stats import StatsServer  # only with stats: a proxy without them is lighter

            stats = StatsServer((host, port + index if port else 0))
        except OSError as exc:
            log.error("cannot serve stats on %s: %s", format_addr(args.stats_listen), exc.strerror or exc)
            return 1
    try:
        routes = build_routes(args)
    except (OSError, ValueError) as exc:
        if stats is not None:
            stats.close()
        log.error("%s", exc)
        return 2
    pool = SplicePool(workers=args.workers, pipe_size=args.pipe_size, bind_cpus=args.bind_cpus)
    try:
        server = _server(args, pool, routes, argv)
    except (OSError, ValueError) as exc:
        pool.close()
        if stats is not None:
            stats.close()
        if isinstance(exc, ValueError):
            log.error("--connect %s", exc)
            return 2
        log.error("cannot listen on %s: %s", format_addr(args.listen), exc.strerror or exc)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        server.stop()

    def on_ignored(signum: int, _frame: Any) -> None:
        server.warn_soon(_ignored_line(signum))

    def on_reload(signum: int, _frame: Any) -> None:
        server.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_reload)
    # Held back since main() began (or the fork): one that came meanwhile reloads now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    for signum in _IGNORED:
        signal.signal(signum, on_ignored)
    _warn_wildcard("listening", server.address, "anyone who can reach this host can use the proxy")
    if stats is not None:
        stats.start(server)
        _warn_wildcard("stats", stats.address, "anyone who can reach this host can read them")
        log.info("stats on http://%s/stats and /metrics", format_addr(stats.address))
    try:
        server.serve_forever(grace=args.grace)
    finally:
        if stats is not None:
            stats.close()
    log.info("stopped after %d connection(s)", server.counters.accepted)
    return 0


def _server(args: argparse.Namespace, pool: SplicePool, routes: Routes,
            argv: list[str] | None = None) -> ProxyServer:
    common: dict[str, Any] = {
        "pool": pool,
        "reloader": make_reloader(argv, args) if args.config is not None else None,
        "idle": None if args.idle == _INF else args.idle,
        "max_conns": args.max_conns,
        "connect_timeout": args.connect_timeout,
        "nodelay": args.nodelay,
        "reuse_port": args.reuse_port or args.processes > 1,
    }
    if args.command == "http":
        from .http import HttpProxyServer  # only for http: h11 and the HTTP code

        return HttpProxyServer(
            args.listen, routes, keepalive_timeout=args.keepalive_timeout,
            response_timeout=args.response_timeout, proto=args.forwarded_proto,
            max_idle=args.max_idle_upstream, upstream_idle=args.upstream_idle_timeout, **common,
        )
    return ProxyServer(args.listen, routes, on_worker=not args.loop_thread, **common)


_RESTART_FIRST = 0.1  # seconds before replacing a dead child...
_RESTART_MAX = 5.0  # ...doubling up to this while children keep dying fast
_STABLE = 10.0  # a child that ran this long died "slowly": the next back-off starts over
_CHILD_CRASHED = 70  # a child's exit status after an unexpected exception (EX_SOFTWARE)
_SUPERVISOR_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *_IGNORED}


def _how_it_died(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _looping_backend(listen: tuple[str, int], routes: Routes) -> str | None:
    """The name of a backend of ``routes`` that is the ``listen`` address itself (a wildcard
    listen included), or None; OSError when ``listen`` does not resolve."""
    listens = socket.getaddrinfo(lookup_host(listen[0]), listen[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[:1]
    for backend in routes.backends:
        if any(loops_back(where[4], up[4]) for where in listens for up in backend.addresses):
            return backend.name
    return None


def _reloaded_args(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """``args`` with what a reload changes (the RELOADABLE options) as the --config file gives
    it now: what a child started after a SIGHUP must begin with, as its siblings reloaded.
    ``args`` itself when there is no file or the children refuse it (they log why)."""
    if args.config is None:
        return args
    try:
        fresh = load_args(argv, raising=True)
        routes = build_routes(fresh)  # a name that does not resolve: the children refuse it
        if _looping_backend(args.listen, routes) is not None:
            return args  # the children refuse it too; a child started with it could not start
    except (OSError, ValueError):
        return args
    merged = argparse.Namespace(**vars(args))
    for key, value in vars(fresh).items():
        if key.replace("_", "-") in RELOADABLE:
            setattr(merged, key, value)
    logging.getLogger().setLevel(getattr(logging, merged.log_level.upper()))  # a child's, at fork
    return merged


def run_processes(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Supervise ``--processes`` children on one port.

    A child that dies is logged and replaced after a back-off; one that fails to start
    (status 1 or 2: cannot listen, cannot serve stats, --connect loops back) stops them all,
    and the parent exits with its status. SIGINT/SIGTERM are forwarded to the children;
    the parent exits 0 once every child has exited 0. SIGHUP is forwarded to the children
    (each reloads its --config file), and a child started after it begins with the file as
    it was then, as its siblings run. Signals are taken synchronously
    (blocked, then ``sigtimedwait``): no handler runs in the middle of the loop.
    """
    log = logging.getLogger("splicepool.proxy")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)
    pids: dict[int, int] = {}  # pid -> process index
    started: dict[int, float] = {}  # index -> when its current child started
    delays: dict[int, float] = {}  # index -> its last back-off
    due: dict[int, float] = {}  # index -> when to start its replacement
    stopping = 0  # the signal to stop on, once received
    failed = 0  # the status of a child that could not start, or of one that ended badly

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            status = _CHILD_CRASHED
            try:
                for signum in _SUPERVISOR_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                # SIGHUP stays blocked until run_proxy handles it: one forwarded before
                # then must reload this child, not kill it (its default action)
                signal.pthread_sigmask(signal.SIG_SETMASK, {*old_mask, signal.SIGHUP})
                status = run_proxy(args, index, argv)
            except BaseException:
                log.exception("process %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)  # private-ok: os._exit is public; a forked child must not run atexit
        pids[pid] = index
        started[index] = time.monotonic()
        log.info("process %d started: pid %d", index, pid)

    def stop_all(signum: int) -> None:
        due.clear()
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    try:
        for index in range(args.processes):
            spawn(index)
        while pids or (due and not stopping):
            timeout = 3600.0
            if due:
                timeout = max(0.0, min(due.values()) - time.monotonic())
            info = signal.sigtimedwait(_SUPERVISOR_SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                if not stopping:
                    log.info("stopping %d process(es)", len(pids))
                stopping = info.si_signo
                stop_all(stopping)
            elif info is not None and info.si_signo == signal.SIGHUP and not stopping:
                log.info("SIGHUP: %d process(es) reload", len(pids))
                stop_all(signal.SIGHUP)  # each child re-reads the --config file itself
                args = _reloaded_args(args, argv)  # and a child started from now on starts so
            elif info is not None and info.si_signo in _IGNORED:
                log.warning("%s", _ignored_line(info.si_signo))
            while pids:  # reap every child that ended (SIGCHLDs may have merged)
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                index = pids.pop(pid, None)
                if index is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                if stopping or failed:
                    if code != 0:
                        log.warning("process %d (pid %d) %s", index, pid, _how_it_died(status))
                        failed = failed or 1
                    continue
                if code in (1, 2):  # it could not start: another try would fail the same way
                    log.error("process %d (pid %d) %s: stopping", index, pid, _how_it_died(status))
                    failed = code
                    stop_all(signal.SIGTERM)
                    continue
                lived = time.monotonic() - started[index]
                last = delays.get(index)
                delay = _RESTART_FIRST if last is None or lived >= _STABLE else min(last * 2, _RESTART_MAX)
                delays[index] = delay
                due[index] = time.monotonic() + delay
                log.warning(
                    "process %d (pid %d) %s; starting a new one in %.1f s",
                    index, pid, _how_it_died(status), delay,
                )
            now = time.monotonic()
            for index, when in sorted(due.items()):
                if when <= now and not stopping and not failed:
                    del due[index]
                    spawn(index)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return failed


def main(argv: list[str] | None = None) -> int:
    # A SIGHUP before its handler is in place would kill the proxy (its default action):
    # block it until run_proxy handles it (run_processes blocks it itself).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    args = load_args(argv)
    log_to_stderr(args.log_level)
    limit = raise_nofile_limit()
    logging.getLogger("splicepool.proxy").debug("open-file limit: %d", limit)
    try:
        routes = build_routes(args)
    except ValueError as exc:  # options that do not go together: a usage error, status 2
        build_parser().error(str(exc))
    except OSError as exc:  # a backend's name does not resolve: status 1
        raise SystemExit(str(exc)) from None
    try:
        looping = _looping_backend(args.listen, routes)
    except OSError as exc:
        raise SystemExit(f"--listen {format_addr(args.listen)}: {exc}") from None
    if looping is not None:
        build_parser().error(
            f"--connect {looping} is this proxy's own --listen address "
            "(every connection would loop back into the proxy)"
        )
    if args.command == "socks" and not args.allow_target:
        logging.getLogger("splicepool.proxy").warning(
            "socks: clients may connect to any address but this proxy's own (no --allow-target)")
    if args.processes > 1:
        return run_processes(args, argv)
    return run_proxy(args, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
