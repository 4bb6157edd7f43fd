"""The status record's facts, boot durations and per-minute counts: what a machine says of itself kept with it and
bounded, how long the server took to boot it, and the last hour's boots as the page's chart draws them."""

from __future__ import annotations

import pytest

from netboot.status import record as record_module
from netboot.status.app import _ago, _took
from netboot.status.chart import boots_chart
from netboot.status.record import MAX_FACT, MAX_LOOSE, BootRecord

A, B = "52:54:00:00:10:01", "52:54:00:00:10:02"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1_700_000_000.0]
    monkeypatch.setattr(record_module, "_now", lambda: now[0])
    return now


def boot(record: BootRecord, mac: str, clock: list[float], seconds: float, overlay: bool = False) -> None:
    """A machine's boot over HTTP taking `seconds` from its script to its last file."""
    hyphens = mac.replace(":", "-")
    record.record("192.0.2.5", "http", f"/machine/{hyphens}/boot.ipxe", "200", True, 500, mac, "rack", 0,
                  (("uuid", "4c4c4544-0000"), ("serial", "SN1")))
    clock[0] += seconds / 2
    record.record("192.0.2.5", "http", f"/machine/{hyphens}/abc/bzImage", "200", True, 8 << 20, mac, "rack")
    clock[0] += seconds / 2 if not overlay else seconds / 4
    record.record("192.0.2.5", "http", f"/machine/{hyphens}/abc/initrd", "200", True, 40 << 20, mac, "rack")
    if overlay:
        clock[0] += seconds / 4
        record.record("192.0.2.5", "http", f"/machine/{hyphens}/abc/overlay", "200", True, 4096, mac, "rack")


def test_a_boot_takes_from_its_script_to_its_last_file(clock: list[float]) -> None:
    record = BootRecord(lambda profile: ("abc", "/nix/store/x"))
    boot(record, A, clock, 8.5)
    boot(record, B, clock, 12.0, overlay=True)
    record.record("192.0.2.6", "http", "/machine/52-54-00-00-10-01/boot.ipxe", "200", True, 500, A, "rack")
    machines = {mac: m.json(record.snapshot().systems) for mac, m in record.machines.items()}
    assert (machines[B]["state"], machines[B]["boot_seconds"]) == ("handed-over", 12.0)
    assert machines[B]["handed_over"] == record_module.iso(clock[0])
    # A boots again: a new boot, not handed over yet (its facts stay from the script before).
    assert (machines[A]["state"], machines[A]["boot_seconds"], machines[A]["handed_over"]) == ("booting", None, None)
    assert machines[A]["facts"] == {"uuid": "4c4c4544-0000", "serial": "SN1"}


def test_a_machine_whose_profile_has_an_overlay_is_handed_over_by_its_overlay(clock: list[float]) -> None:
    record = BootRecord(lambda profile: ("abc", "/nix/store/x"))
    record.configure({A: "rack", B: "rack"}, overlaid={"rack"})
    boot(record, A, clock, 8.0)  # its initrd, and never its overlay
    boot(record, B, clock, 12.0, overlay=True)
    snapshot = record.snapshot()
    a, b = (snapshot.machine(mac).json(snapshot.systems) for mac in (A, B))
    assert (a["state"], a["handed_over"], a["boot_seconds"]) == ("booting", None, None)
    assert (b["state"], b["boot_seconds"]) == ("handed-over", 12.0)
    assert snapshot.states()["handed-over"] == 1 and snapshot.states()["booting"] == 1
    assert snapshot.handed_over == {"rack": 1} and sum(m[2] for m in snapshot.per_minute()) == 1
    # Its overlay, late: handed over now, the boot taking until then.
    clock[0] += 2.0
    record.record("192.0.2.5", "http", "/machine/52-54-00-00-10-01/abc/overlay", "200", True, 4096, A, "rack")
    snapshot = record.snapshot()
    a = snapshot.machine(A).json(snapshot.systems)
    assert (a["state"], a["boot_seconds"]) == ("handed-over", 8.0 + 12.0 + 2.0)  # (B booted meanwhile)
    assert snapshot.handed_over == {"rack": 2}
    # A profile without an overlay (after a reload that took it away) is handed over by its initrd.
    record.configure({A: "rack", B: "rack"})
    boot(record, A, clock, 5.0)
    snapshot = record.snapshot()
    assert snapshot.machine(A).json(snapshot.systems)["state"] == "handed-over"


def test_boots_per_minute_for_the_chart(clock: list[float]) -> None:
    clock[0] = 60 * 28_000_000 + 5  # the start of a minute
    record = BootRecord(lambda profile: ("abc", "/nix/store/x"))
    boot(record, A, clock, 10)
    clock[0] += 120
    boot(record, B, clock, 10)
    record.record("192.0.2.7", "http", "/machine/52-54-00-00-10-03/boot.ipxe", "200", True, 500, "52:54:00:00:10:03",
                  "rack")
    per_minute = record.snapshot().per_minute()
    assert len(per_minute) == 60 and per_minute[-1][0] == 0 and per_minute[0][0] == 59
    assert [m for m in per_minute if m[1] or m[2]] == [(2, 1, 1), (0, 2, 1)]
    chart = boots_chart(per_minute)
    assert (chart.started, chart.handed_over, chart.peak) == (3, 2, 2)
    bars = {(b.ago, b.kind): b for b in chart.bars}
    assert set(bars) == {(2, "started"), (2, "handed-over"), (0, "started"), (0, "handed-over")}
    # The peak fills the plot; a bar of half the peak is half as tall; the newest minute is on the right.
    assert bars[0, "started"].height == pytest.approx(2 * bars[2, "started"].height)
    assert bars[0, "started"].y == chart.top and bars[0, "started"].x > bars[2, "started"].x
    # An hour later, nothing is left.
    clock[0] += 3600
    assert not any(m[1] or m[2] for m in record.snapshot().per_minute())


def test_facts_are_cut_short_and_go_with_their_machine(clock: list[float]) -> None:
    record = BootRecord(max_machines=2)
    before = record.bytes
    record.record("192.0.2.5", "tftp", "/machine/x/boot.ipxe", "complete", True, 500, A, None, 0,
                  (("product", "\x1b[31m" + "p" * 10_000), ("colour", "red"), ("serial", "")))
    facts = record.snapshot().machine(A).facts
    assert facts == (("product", "?[31m" + "p" * (MAX_FACT - 5)),)  # unknown keys and empty values left out
    assert record.bytes - before < 1000
    record.note_facts(A, (("dhcp_arch", "7 (uefi-x64-pxe)"), ("interface", "eth1")))
    assert dict(record.snapshot().machine(A).facts) == {"product": "?[31m" + "p" * 59,
                                                        "dhcp_arch": "7 (uefi-x64-pxe)", "interface": "eth1"}
    # Beyond max_machines, A is forgotten, and its facts with it: the bytes go back down.
    for i in range(3):
        record.record("192.0.2.5", "http", "/machine/y/boot.ipxe", "200", True, 500, f"02:00:00:00:00:0{i}", None)
    record.flush()
    assert record.snapshot().machine(A).facts == ()
    assert A not in record.snapshot().facts


def test_facts_of_machines_dhcp_answered_are_bounded(clock: list[float]) -> None:
    record = BootRecord()
    record.configure({A: "rack"})
    for i in range(MAX_LOOSE + 500):
        record.note_facts(f"02:00:00:01:{i >> 8:02x}:{i & 0xFF:02x}", (("dhcp_arch", "0 (bios-pxe)"),))
    record.note_facts(A, (("interface", "eth0"),))
    snapshot = record.snapshot()
    assert len(snapshot.facts) == MAX_LOOSE + 1  # the last 1,000 loose ones, and the configured machine's
    assert "02:00:00:01:00:00" not in snapshot.facts and "02:00:00:01:05:db" in snapshot.facts
    assert snapshot.machine(A).facts == (("interface", "eth0"),)
    # A loose machine that then asks for its script keeps its facts, now as its machine's.
    mac = "02:00:00:01:05:db"
    record.record("192.0.2.5", "http", "/machine/z/boot.ipxe", "200", True, 500, mac, None, 0, (("platform", "efi"),))
    assert dict(record.snapshot().machine(mac).facts) == {"platform": "efi", "dhcp_arch": "0 (bios-pxe)"}


def test_durations_and_times_as_the_page_shows_them() -> None:
    assert [_took(s) for s in (None, 8.44, 59.96, 72.5, 3725)] == ["", "8.4 s", "1 min 0 s", "1 min 12 s", "62 min 5 s"]
    ago = _ago(1_700_000_000.25)
    assert [ago(record_module.iso(1_700_000_000.25 - s)) for s in (0, 12, 125, 7200, 90_000)] == [
        "now", "12 s ago", "2 min ago", "2 h ago", "1 d ago"]
    assert ago(None) == ""
