"""/metrics: the boot record's counters and the servers' live figures, in Prometheus' text format.

A custom collector reads them when Prometheus scrapes, so the request path only increments integers;
prometheus_client writes the exposition format. A scrape is gathered on the event loop (`Metrics.gather`: a
snapshot of the record and the live figures) and written in a thread (`Metrics.text`), since counting the
states of 10,000 machines takes longer than a boot request should wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from netboot.status.record import STATES, BootRecord, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Live:
    """Figures only the servers know, read at each scrape."""

    tftp_in_flight: Callable[[], int] = lambda: 0
    tftp_refused: Callable[[], int] = lambda: 0
    builds: Callable[[], dict[str, tuple[str, str]]] = dict  # profile -> (build id, system)


@dataclass(frozen=True)
class Scrape:
    """What one scrape shows, gathered on the event loop."""

    record: Snapshot
    tftp_in_flight: int
    tftp_refused: int
    builds: dict[str, tuple[str, str]]


class _Collector(Collector):
    def __init__(self) -> None:
        self.scrape: Scrape | None = None

    def collect(self) -> Iterator[Metric]:
        if self.scrape is None:
            return
        r, live = self.scrape.record, self.scrape
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
        handed = CounterMetricFamily("netboot_boots_handed_over", "Boots handed over: their initrd sent whole, "
                                     "and their overlay if their profile has one, by profile", labels=["profile"])
        for profile, n in sorted(r.handed_over.items()):
            handed.add_metric([profile], n)
        yield handed
        yield CounterMetricFamily("netboot_tftp_retransmissions", "TFTP packets sent again",
                                  value=r.tftp_retransmissions)
        yield CounterMetricFamily("netboot_tftp_timeouts", "TFTP transfers given up for lack of answers",
                                  value=r.tftp_timeouts)
        yield CounterMetricFamily("netboot_tftp_refused", "TFTP requests answered with an error or dropped "
                                  "from the waiting queue", value=live.tftp_refused)
        flight = GaugeMetricFamily("netboot_transfers_in_flight", "Transfers in progress", labels=["protocol"])
        flight.add_metric(["http"], r.http_in_flight)
        flight.add_metric(["tftp"], live.tftp_in_flight)
        yield flight
        machines = GaugeMetricFamily("netboot_machines", "Machines known, by state", labels=["state"])
        states = r.states()
        for state in STATES:
            machines.add_metric([state], states[state])
        yield machines
        info = InfoMetricFamily("netboot_build", "The build each profile serves now", labels=["profile"])
        for profile, (build, system) in sorted(live.builds.items()):
            info.add_metric([profile], {"build": build, "system": system})
        yield info
        yield CounterMetricFamily("netboot_reloads", "Reloads of the machines file", value=r.reloads)
        yield CounterMetricFamily("netboot_reload_failures", "Reloads refused (the previous configuration kept)",
                                  value=r.reload_failures)


class Metrics:
    def __init__(self, record: BootRecord, live: Live) -> None:
        self.record = record
        self.live = live
        self._collector = _Collector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)

    def gather(self) -> Scrape:
        """On the event loop: what the scrape shows."""
        live = self.live
        return Scrape(self.record.snapshot(), live.tftp_in_flight(), live.tftp_refused(), live.builds())

    def text(self, scrape: Scrape) -> bytes:
        """The exposition, from one thread at a time (the status listener's own)."""
        self._collector.scrape = scrape
        try:
            return generate_latest(self.registry)
        finally:
            self._collector.scrape = None
