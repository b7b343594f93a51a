import pytest

from leitstand.access.proxies import TrustedProxies, parse_networks


@pytest.fixture
def proxies() -> TrustedProxies:
    return TrustedProxies(parse_networks("127.0.0.1, 10.0.0.0/8, ::1"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("127.0.0.1", b"203.0.113.5", "203.0.113.5"),
        ("127.0.0.1", b"192.0.2.1, 203.0.113.5", "203.0.113.5"),  # the leftmost is the client's word
        ("127.0.0.1", b"203.0.113.5, 10.1.2.3", "203.0.113.5"),  # a chain of our own proxies
        ("127.0.0.1", b"10.1.2.3, 10.4.5.6", "10.1.2.3"),  # only proxies: where it came in
        ("127.0.0.1", b"not-an-address", "127.0.0.1"),
        ("127.0.0.1", b" , ", "127.0.0.1"),
        ("::1", b"2001:db8::7", "2001:db8::7"),
        ("198.51.100.9", b"203.0.113.5", "198.51.100.9"),  # not a trusted proxy: header ignored
        ("127.0.0.1", None, "127.0.0.1"),
    ],
)
def test_client_address(proxies: TrustedProxies, peer: str, forwarded_for: bytes | None, client: str) -> None:
    assert proxies.client(peer, forwarded_for) == client


def test_no_trusted_proxies_means_no_header_is_believed() -> None:
    none = TrustedProxies(())
    assert not none
    assert none.client("127.0.0.1", b"203.0.113.5") == "127.0.0.1"


def test_bad_networks_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_networks("proxy.example.com")
