"""The README's client-side load balancing: with `round_robin` a client spreads its calls over every
address its target resolves to (the headless Service's pods); with gRPC's default it sticks to one.
Two real servers stand in for two pods, a static address list for the Service's DNS records."""
from __future__ import annotations

import pytest

from server.client import AttnserveClient
from tests.server.helpers import ServerProcess, wait_until

pytestmark = pytest.mark.slow


def calls_per_server(servers, options) -> list[float]:
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    before = [s.metric("attnserve_requests_finished_total") for s in servers]
    with AttnserveClient(target, timeout=30, options=options) as client:
        for _ in range(12):
            client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=2)

    def counted():
        return [s.metric("attnserve_requests_finished_total") - b for s, b in zip(servers, before)]

    # The engine reports a request just after its answer: wait until all 12 are counted, on whichever server.
    wait_until(lambda: sum(counted()) >= 12, 30, lambda: f"{counted()} of 12 requests counted")
    return counted()


def test_round_robin_spreads_calls_over_every_pod(test_model_dir):
    servers = [ServerProcess(test_model_dir, "--kv-slots", "2", "--max-seq-len", "256") for _ in range(2)]
    try:
        spread = calls_per_server(servers, [("grpc.lb_policy_name", "round_robin")])
        sticky = calls_per_server(servers, [])
    finally:
        for server in servers:
            server.stop()
    assert sum(spread) == sum(sticky) == 12
    assert all(n > 0 for n in spread), spread
    assert sorted(sticky) == [0, 12], sticky
