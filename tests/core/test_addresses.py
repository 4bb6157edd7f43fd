"""Interface addresses from pyroute2, checked against iproute2's `ip addr`."""

from __future__ import annotations

import ipaddress
import json
import subprocess

from support import need

from netboot.core.addresses import reachable_hosts


def ip_addr() -> list[str]:
    need("ip")
    links = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    return [a["local"] for link in links for a in link.get("addr_info", [])]


def test_wildcards_expand_to_every_routable_address() -> None:
    expected = [
        a for a in ip_addr() if not (ipaddress.ip_address(a).is_loopback or ipaddress.ip_address(a).is_link_local)
    ]
    v4 = [a for a in expected if ":" not in a]
    assert sorted(reachable_hosts("0.0.0.0")) == sorted(v4)
    assert sorted(reachable_hosts("::")) == sorted(expected)
    assert reachable_hosts("127.0.0.1") == ["127.0.0.1"]
