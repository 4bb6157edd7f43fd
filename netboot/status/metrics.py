"""/metrics: the boot record's counters and the servers' live figures, in Prometheus' text format.

A custom collector reads them when Prometheus scrapes, so the request path only increments integers;
prometheus_client writes the exposition format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from netboot.status.record import STATES, BootRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Live:
    """Figures only the servers know, read at each scrape."""

    tftp_in_flight: Callable[[], int] = lambda: 0
    tftp_refused: Callable[[], int] = lambda: 0
    builds: Callable[[], dict[str, tuple[str, str]]] = dict  # profile -> (build id, system)


class _Collector(Collector):
    def __init__(self, record: BootRecord, live: Live) -> None:
        self.record = record
        self.live = live

    def collect(self) -> Iterator[Metric]:
        r = self.record
        requests = CounterMetricFamily("netboot_requests", "Requests and transfers that ended, by protocol and "
                                       "status (HTTP code or TFTP outcome)", labels=["protocol", "status"])
        sent = CounterMetricFamily("netboot_sent_bytes", "Payload bytes sent, by protocol and status",
                                   labels=["protocol", "status"])
        for (protocol, status), n in sorted(r.requests.items()):
            requests.add_metric([protocol, status], n)
            sent.add_metric([protocol, status], r.sent[protocol, status])
        yield requests
        yield sent
        started = CounterMetricFamily("netboot_boots_started", "Boots started (a machine fetched its script), "
                                      "by profile", labels=["profile"])
        for profile, n in sorted(r.boots_started.items()):
            started.add_metric([profile], n)
        yield started
        handed = CounterMetricFamily("netboot_boots_handed_over", "Boots whose initrd was sent whole, by profile",
                                     labels=["profile"])
        for profile, n in sorted(r.handed_over.items()):
            handed.add_metric([profile], n)
        yield handed
        yield CounterMetricFamily("netboot_tftp_retransmissions", "TFTP packets sent again",
                                  value=r.tftp_retransmissions)
        yield CounterMetricFamily("netboot_tftp_timeouts", "TFTP transfers given up for lack of answers",
                                  value=r.tftp_timeouts)
        yield CounterMetricFamily("netboot_tftp_refused", "TFTP requests answered with an error or dropped "
                                  "from the waiting queue", value=self.live.tftp_refused())
        flight = GaugeMetricFamily("netboot_transfers_in_flight", "Transfers in progress", labels=["protocol"])
        flight.add_metric(["http"], r.http_in_flight)
        flight.add_metric(["tftp"], self.live.tftp_in_flight())
        yield flight
        machines = GaugeMetricFamily("netboot_machines", "Machines known, by state", labels=["state"])
        states = r.states()
        for state in STATES:
            machines.add_metric([state], states[state])
        yield machines
        info = InfoMetricFamily("netboot_build", "The build each profile serves now", labels=["profile"])
        for profile, (build, system) in sorted(self.live.builds().items()):
            info.add_metric([profile], {"build": build, "system": system})
        yield info
        yield CounterMetricFamily("netboot_reloads", "Reloads of the machines file", value=r.reloads)
        yield CounterMetricFamily("netboot_reload_failures", "Reloads refused (the previous configuration kept)",
                                  value=r.reload_failures)


class Metrics:
    def __init__(self, record: BootRecord, live: Live) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(record, live))

    def text(self) -> bytes:
        return generate_latest(self.registry)
