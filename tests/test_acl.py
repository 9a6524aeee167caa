"""splicepool.acl: exact verdicts for IPv4, IPv6, IPv4-mapped and scoped addresses, exact
errors for bad entries, and verdicts on the real peer addresses of loopback connections."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from conftest import engine_free
from hypothesis import given, settings
from hypothesis import strategies as st

from splicepool.acl import AccessList

pytestmark = engine_free


def test_an_empty_list_is_false_and_permits_everything():
    acl = AccessList()
    assert not acl and bool(acl) is False
    assert acl.allow == () and acl.deny == ()
    assert [acl.permits(ip) for ip in ("1.2.3.4", "::1", "::ffff:10.0.0.1")] == [True] * 3
    assert acl.describe() == "allow all"
    assert AccessList([], []) == acl


def test_allow_entries_admit_only_their_networks():
    acl = AccessList(allow=["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"])
    assert acl and bool(acl) is True
    assert acl.allow == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv6Network("2001:db8::/32"),
    )
    verdicts = {
        ip: acl.permits(ip)
        for ip in [
            "10.0.0.0", "10.255.255.255", "11.0.0.0", "9.255.255.255", "127.0.0.1",
            "127.0.0.2", "2001:db8::1", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db9::", "::1", "::ffff:10.1.2.3", "::ffff:11.1.2.3",
        ]
    }  # fmt: skip
    assert verdicts == {
        "10.0.0.0": True, "10.255.255.255": True, "11.0.0.0": False, "9.255.255.255": False,
        "127.0.0.1": True, "127.0.0.2": False, "2001:db8::1": True,
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": True, "2001:db9::": False, "::1": False,
        "::ffff:10.1.2.3": True, "::ffff:11.1.2.3": False,
    }  # fmt: skip
    assert acl.describe() == "allow 10.0.0.0/8, 127.0.0.1/32, 2001:db8::/32"


def test_deny_wins_over_allow():
    acl = AccessList(allow=["10.0.0.0/8", "::/0"], deny=["10.1.0.0/16", "::1", "10.2.3.4"])
    assert [acl.permits(ip) for ip in ("10.0.0.1", "10.1.0.1", "10.1.255.255", "10.2.3.4")] == [
        True, False, False, False,
    ]  # fmt: skip
    assert [acl.permits(ip) for ip in ("::2", "::1", "fe80::1", "::ffff:10.1.0.1")] == [
        True, False, True, False,
    ]  # fmt: skip
    assert acl.describe() == "allow 10.0.0.0/8, ::/0; deny 10.1.0.0/16, ::1/128, 10.2.3.4/32"


def test_deny_only_permits_everything_else():
    acl = AccessList(deny=["192.168.0.0/16"])
    assert acl
    assert acl.permits("192.168.1.1") is False
    assert acl.permits("192.169.0.0") is True
    assert acl.permits("::ffff:192.168.1.1") is False
    assert acl.permits("2001:db8::1") is True
    assert acl.describe() == "allow all; deny 192.168.0.0/16"


def test_ipv6_entries_never_match_ipv4_clients():
    acl = AccessList(allow=["::/0"])
    assert acl.permits("::1") is True
    assert acl.permits("1.2.3.4") is False
    assert acl.permits("::ffff:1.2.3.4") is False  # checked as 1.2.3.4


def test_mapped_entries_are_stored_as_ipv4():
    acl = AccessList(allow=["::ffff:10.0.0.0/104", "::ffff:127.0.0.1"], deny=["::ffff:0:0/96"])
    assert acl.allow == (ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("127.0.0.1/32"))
    assert acl.deny == (ipaddress.IPv4Network("0.0.0.0/0"),)
    acl = AccessList(allow=["::ffff:10.0.0.0/104"])
    assert acl.permits("10.9.9.9") is True
    assert acl.permits("::ffff:10.9.9.9") is True
    assert acl.permits("11.0.0.1") is False


def test_a_scope_on_the_client_address_is_ignored():
    acl = AccessList(allow=["fe80::/10"], deny=["fe80::bad"])
    assert acl.permits("fe80::1%eth0") is True
    assert acl.permits("fe80::1%2") is True
    assert acl.permits("fe80::bad%lo") is False
    assert acl.permits("fe81::1%lo") is True  # fe80::/10 covers fe80 to febf
    assert acl.permits("fec0::1%lo") is False


def test_ipaddress_objects_are_accepted():
    acl = AccessList(allow=["10.0.0.0/8"])
    assert acl.permits(ipaddress.ip_address("10.1.1.1")) is True
    assert acl.permits(ipaddress.ip_address("::ffff:10.1.1.1")) is True
    assert acl.permits(ipaddress.ip_address("12.1.1.1")) is False


def test_entries_may_have_blanks_around_them():
    acl = AccessList(allow=[" 10.0.0.0/8 ", "\t::1\n"])
    assert acl.describe() == "allow 10.0.0.0/8, ::1/128"


@pytest.mark.parametrize(
    ("allow", "deny", "message"),
    [
        (["10.0.0.0/8", "banana"], [], "allow entry 'banana' is not an IP address or CIDR"),
        ([], ["10.0.0.0/33"], "deny entry '10.0.0.0/33' is not an IP address or CIDR"),
        (["10.0.0.1/8"], [], "allow entry '10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)"),
        ([], ["2001:db8::1/32"], "deny entry '2001:db8::1/32' has host bits set (the network is 2001:db8::/32)"),
        (["  "], [], "allow entry '  ' is empty"),
        ([], [""], "deny entry '' is empty"),
        (["fe80::1%eth0"], [], "allow entry 'fe80::1%eth0' has a %scope"),
        (["10.0.0"], [], "allow entry '10.0.0' is not an IP address or CIDR"),
        (["[::1]"], [], "allow entry '[::1]' is not an IP address or CIDR"),
    ],
)  # fmt: skip
def test_bad_entries_raise_naming_the_entry_and_its_list(allow, deny, message):
    with pytest.raises(ValueError) as info:
        AccessList(allow=allow, deny=deny)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"allow": "10.0.0.0/8"}, "allow must be a list of entries, not one string"),
        ({"deny": b"10.0.0.0/8"}, "deny must be a list of entries, not one string"),
        ({"allow": [167772160]}, "allow entry 167772160 is not a string"),
        ({"deny": 5}, "deny must be an iterable of strings"),
    ],
)
def test_wrong_types_raise_typeerror(kwargs, message):
    with pytest.raises(TypeError) as info:
        AccessList(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "ip", ["", "localhost", "1.2.3", "1.2.3.4%eth0", "[::1]", "::1/128", "1.2.3.4 "]
)
def test_permits_rejects_text_that_is_not_an_address(ip):
    acl = AccessList(allow=["0.0.0.0/0"])
    with pytest.raises(ValueError) as info:
        acl.permits(ip)
    assert str(info.value) == f"{ip!r} is not an IP address"


def test_permits_rejects_other_types():
    with pytest.raises(TypeError, match="must be a string"):
        AccessList().permits(b"1.2.3.4")


def test_repr_and_equality():
    acl = AccessList(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
    assert repr(acl) == "AccessList(allow=['10.0.0.0/8'], deny=['10.1.0.0/16'])"
    assert acl == AccessList(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
    assert acl != AccessList(allow=["10.0.0.0/8"])
    assert hash(acl) == hash(AccessList(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"]))


@settings(max_examples=300, deadline=None)
@given(
    nets=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=6),
    denied=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=6),
    ip=st.integers(0, 2**32 - 1),
)
def test_verdicts_match_ipaddress_membership(nets, denied, ip):
    def entries(pairs):
        return [str(ipaddress.ip_network((a, p), strict=False)) for a, p in pairs]

    allow, deny = entries(nets), entries(denied)
    acl = AccessList(allow=allow, deny=deny)
    addr = ipaddress.IPv4Address(ip)
    expected = not any(addr in ipaddress.ip_network(d) for d in deny) and (
        not allow or any(addr in ipaddress.ip_network(a) for a in allow)
    )
    assert acl.permits(str(addr)) is expected
    assert acl.permits(f"::ffff:{addr}") is expected


# --- real sockets ---------------------------------------------------------------------------


def accepted_peers(listen_host: str, sources: list[str]) -> list[str]:
    """Connect from each source address to a listener on ``listen_host``; the peer address
    text the listener's accepted socket reports for each, in order."""
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    peers = []
    with socket.socket(family, socket.SOCK_STREAM) as lsock:
        if family == socket.AF_INET6:
            lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.bind((listen_host, 0))
        lsock.listen(len(sources))
        port = lsock.getsockname()[1]
        lsock.settimeout(5)
        for source in sources:
            with socket.create_connection(("127.0.0.1", port), 5, (source, 0)) as client:
                conn, _ = lsock.accept()
                with conn:
                    assert conn.getpeername()[1] == client.getsockname()[1]
                    peers.append(conn.getpeername()[0])
    return peers


def test_real_peer_addresses_on_loopback_get_the_expected_verdicts():
    peers = accepted_peers("127.0.0.1", ["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    assert peers == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    acl = AccessList(allow=["127.0.0.0/30"], deny=["127.0.0.2"])
    assert [acl.permits(p) for p in peers] == [True, False, True]
    only_three = AccessList(allow=["127.0.0.3/32"])
    assert [only_three.permits(p) for p in peers] == [False, False, True]


def test_ipv4_peers_of_a_dual_stack_listener_are_checked_as_ipv4():
    try:
        peers = accepted_peers("::", ["127.0.0.2", "127.0.0.3"])
    except OSError as exc:  # no IPv6 in this sandbox
        pytest.skip(f"no dual-stack IPv6 listener here: {exc}")
    assert peers == ["::ffff:127.0.0.2", "::ffff:127.0.0.3"]
    acl = AccessList(allow=["127.0.0.0/8"], deny=["127.0.0.3"])
    assert [acl.permits(p) for p in peers] == [True, False]
