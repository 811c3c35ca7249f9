"""Who a connection counts as for per-client limits, and the steps per second each client may send."""

from __future__ import annotations

from swarm.node.admission import StepRate, client_address


def test_a_client_is_its_ip_address_and_loopback_connections_each_count_alone() -> None:
    assert client_address(("203.0.113.7", 50123)) == "203.0.113.7"
    assert client_address(("::ffff:203.0.113.7", 50123, 0, 0)) == "203.0.113.7"
    assert client_address(("127.0.0.1", 50123)) is None  # a local swarm's clients all come from here
    assert client_address(("::1", 50123, 0, 0)) is None
    assert client_address(None) is None  # a unix socket


def test_an_ipv6_client_is_its_slash_64_network_since_one_host_holds_a_whole_one() -> None:
    one = client_address(("2001:db8:1:2:aaaa::1", 1, 0, 0))
    assert one == client_address(("2001:db8:1:2:bbbb::9", 2, 0, 0)) == "2001:db8:1:2::/64"
    assert client_address(("2001:db8:1:3::1", 1, 0, 0)) != one


def test_each_client_sends_at_most_its_steps_per_second_after_a_burst_of_one_second() -> None:
    rate = StepRate(per_second=4)
    assert [rate.allow([("connection", 1)], now=0.0) for _ in range(5)] == [True] * 4 + [False]
    assert rate.allow([("connection", 2)], now=0.0), "another client has its own budget"
    assert rate.allow([("connection", 1)], now=0.25) and not rate.allow([("connection", 1)], now=0.25)


def test_a_step_counts_against_every_client_its_connection_belongs_to() -> None:
    rate = StepRate(per_second=2)
    first, second = [("connection", 1), ("address", "a")], [("connection", 2), ("address", "a")]
    assert rate.allow(first, now=0.0) and rate.allow(second, now=0.0)
    assert not rate.allow(first, now=0.0) and not rate.allow(second, now=0.0), "the address's budget is spent"


def test_no_rate_means_no_limit() -> None:
    rate = StepRate(per_second=0)
    assert all(rate.allow([("connection", 1)], now=0.0) for _ in range(10_000))
