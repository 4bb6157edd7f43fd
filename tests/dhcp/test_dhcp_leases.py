"""Leases: the same choices as the scanning model, kept in the journal across restarts, torn groups ignored,
corruption refused with the files left as they were, the lease file of earlier versions converted."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import reference_leases
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.core.errors import NetbootError
from netboot.dhcp import journal
from netboot.dhcp.journal import JOURNAL, LEGACY, Journal
from netboot.dhcp.leases import OFFER_HOLD, Lease, Leases, Pool

POOL = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.109"), IPv4Network("192.0.2.0/24"),
            excluded=frozenset({IPv4Address("192.0.2.100")}))
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def open_leases(d: Path, pool: Pool = POOL) -> Leases:
    return Leases(pool, Journal(d))


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.endswith(".lock")}


def test_leases_survive_a_restart_and_each_machine_gets_its_own_again(tmp_path: Path) -> None:
    first = open_leases(tmp_path)
    got = {}
    for mac in (A, B):
        got[mac] = first.choose(mac, None, 100.0, {})
        first.commit(mac, got[mac], 100.0, "h")
    first.store.flush()
    assert got == {A: "192.0.2.101", B: "192.0.2.102"}  # .100 is excluded (the server's own)
    assert set(journal.read(tmp_path)[0]) == {A, B}  # durable before close
    first.store.close()
    again = open_leases(tmp_path)
    # Long after expiry, each machine still comes back to its own address, and a newcomer gets a fresh one.
    assert again.choose(B, None, 1e9, {}) == "192.0.2.102"
    assert again.choose(C, None, 1e9, {}) == "192.0.2.103"
    assert again.choose(A, None, 1e9, {}) == "192.0.2.101"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary files left
    again.store.close()


def test_reserved_addresses_are_never_given_to_another(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    reserved = {A: "192.0.2.101"}
    assert leases.choose(B, "192.0.2.101", 0, reserved) == "192.0.2.102"
    assert leases.choose(A, None, 0, reserved) == "192.0.2.101"
    leases.store.close()


def test_expired_addresses_are_reused_only_when_the_range_is_full(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    for i, ip in enumerate(POOL.addresses()):
        mac = f"52:54:00:00:01:{i:02x}"
        leases.commit(mac, str(ip), float(i), "")
    assert leases.choose(C, None, 5.0, {}) is None  # 9 addresses: only the 3 oldest expired... not yet
    assert leases.choose(C, None, 3600.5, {}) == "192.0.2.101"  # the one that expired longest ago
    leases.store.close()


# The indexed allocation makes the choices the scanning model makes, whatever happens in between.

MACS = [f"52:54:00:00:07:{i:02x}" for i in range(14)]  # more machines than addresses
MODEL_POOL = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.111"), IPv4Network("192.0.2.0/24"),
                  lease_time=600, excluded=frozenset({IPv4Address("192.0.2.105")}))
ADDRESSES = [f"192.0.2.{n}" for n in range(98, 114) if n != 105] + ["192.0.2.42"]
STEP = st.one_of(
    st.tuples(st.just("discover"), st.sampled_from(MACS), st.none() | st.sampled_from(ADDRESSES)),
    st.tuples(st.just("request"), st.sampled_from(MACS), st.none() | st.sampled_from(ADDRESSES)),
    st.tuples(st.just("release"), st.sampled_from(MACS), st.sampled_from(ADDRESSES)),
    st.tuples(st.just("decline"), st.sampled_from(MACS), st.sampled_from(ADDRESSES)),
    st.tuples(st.just("forget"), st.sampled_from(MACS), st.none()),
    st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 30.0, 61.0, 700.0, 4000.0]), st.none()),
    st.tuples(st.just("reserve"), st.dictionaries(st.sampled_from(MACS), st.sampled_from(ADDRESSES[2:]), max_size=3)
              .filter(lambda d: len(set(d.values())) == len(d)), st.none()),
)


@settings(max_examples=600, deadline=None)
@given(st.lists(STEP, max_size=120))
def test_the_index_chooses_as_the_scanning_model(tmp_path_factory: pytest.TempPathFactory, steps: list) -> None:
    leases = open_leases(tmp_path_factory.mktemp("model"), MODEL_POOL)
    model = reference_leases.Leases(MODEL_POOL)
    now, reserved = 1000.0, {}
    try:
        for kind, a, b in steps:
            if kind == "wait":
                now += a
            elif kind == "reserve":
                reserved = dict(a)
            elif kind == "discover":
                model.prune(now)
                assert leases.choose(a, b, now, reserved) == model.choose(a, b, now, reserved), (kind, a, b)
            elif kind == "request":
                ip = b or (model.offers[a][0] if a in model.offers else None)
                if ip is None:
                    continue
                model.prune(now)
                free = model.free_for(a, ip, now, reserved)
                assert leases.free_for(a, ip, now, reserved) == free
                if free:
                    leases.commit(a, ip, now)
                    model.commit(a, ip, now)
            elif kind == "release":
                model.prune(now)
                assert leases.release(a, b, now) == model.release(a, b, now)
            elif kind == "decline":
                model.prune(now)
                assert leases.decline(a, b, now) == model.decline(a, b, now)
            else:
                leases.forget_offer(a)
                model.forget_offer(a)
            assert {m: (x.ip, x.expires) for m, x in leases.by_mac.items()} == {
                m: (x.ip, x.expires) for m, x in model.by_mac.items()}
        # And the journal holds what the tables hold.
        leases.store.flush()
        assert journal.read(leases.store.directory)[0] == leases.by_mac
    finally:
        leases.store.close()


def test_a_client_repeating_its_discover_keeps_the_index_bounded(tmp_path: Path) -> None:
    """Each DISCOVER renews the client's offer; a flood of them from one MAC (a minute's worth at a high rate)
    must not leave an entry behind each, and the offer still ends a minute after the last."""
    leases = open_leases(tmp_path)
    for i in range(10_000):
        assert leases.choose(A, None, 100.0 + i * 1e-3, {}) == "192.0.2.101"
    assert len(leases._deadlines) <= 1024 + 2 * len(leases.offers) + 1
    leases.prune(100.0 + 10 + OFFER_HOLD - 1)
    assert A in leases.offers
    leases.prune(100.0 + 10 + OFFER_HOLD + 1)
    assert leases.offers == {} and leases.choose(B, None, 172.0, {}) == "192.0.2.101"
    leases.store.close()


# The journal

def test_a_torn_last_group_is_ignored_and_the_rest_kept(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    leases.commit(A, "192.0.2.101", 100.0, "a")
    leases.store.flush()
    leases.commit(B, "192.0.2.102", 100.0, "b")
    leases.commit(C, "192.0.2.103", 100.0, "c")
    path = tmp_path / JOURNAL
    whole = path.read_bytes()
    leases.store.flush()
    group = path.read_bytes()[len(whole):]
    leases.store.close()
    for cut in (1, len(group) // 2, len(group) - 1):  # a crash in the middle of the last write
        path.write_bytes(whole + group[:cut])
        assert set(journal.read(tmp_path)[0]) == {A}
    path.write_bytes(whole + group[:-12] + b"\0" * 12)  # the end of the write never reached the disk
    assert set(journal.read(tmp_path)[0]) == {A}
    path.write_bytes(whole + b"\0" * 4096)  # the file grew, its data never came
    again = open_leases(tmp_path)
    assert set(again.by_mac) == {A}
    again.store.close()


@pytest.mark.parametrize("damage", ["flip", "cut", "header", "version", "junk line"])
def test_a_corrupt_journal_is_a_clear_error_and_is_left_alone(tmp_path: Path, damage: str) -> None:
    leases = open_leases(tmp_path)
    for i, mac in enumerate((A, B, C)):
        leases.commit(mac, f"192.0.2.{101 + i}", 100.0, "h")
        leases.store.flush()  # three groups
    leases.store.close()
    path = tmp_path / JOURNAL
    data = path.read_bytes()
    lines = data.split(b"\n")
    if damage == "flip":  # a record of the first group changed: its CRC no longer matches
        lines[1] = lines[1].replace(b"192.0.2.101", b"192.0.2.109")
    elif damage == "cut":  # a record lost in the middle
        del lines[3]
    elif damage == "header":
        lines[0] = b"something else"
    elif damage == "version":
        lines[0] = lines[0].replace(b"version=1", b"version=9")
    else:
        lines.insert(2, b"hello")
    path.write_bytes(b"\n".join(lines))
    before = files(tmp_path)
    with pytest.raises(NetbootError) as info:
        open_leases(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: corrupt lease journal (line ") and "\n" not in message
    assert message.endswith("left as it is: repair or remove it to start")
    assert files(tmp_path) == before


# Hostile journals: what a record can hold when the file was damaged or written by someone else.
RECORD = b"lease 52:54:00:00:00:0b 192.0.2.102 100.0 - "
HOSTILE = {
    "brackets": RECORD + b"[" * 100_000,  # once a RecursionError from json.loads, even in a torn group
    "brackets within the longest line": RECORD + b"[" * 4000,
    "braces": RECORD + b'{"a":' * 50_000,
    "a string never closed": RECORD + b'"' + b"\\" * 100_000,
    "digits": RECORD + b"9" * 100_000,
    "an expiry of many digits": b"lease 52:54:00:00:00:0b 192.0.2.102 " + b"1" * 4000 + b' - "h"',
    "a drop of a long name": b"drop " + b"a" * 200_000,
    "a long commit line": b"commit " + b"1" * 10_000,
}


def test_the_longest_record_netboot_writes_is_read_back(tmp_path: Path) -> None:
    """A host name of 253 characters (the machines file's longest), a client identifier of 255 bytes (option 61's
    longest), the longest expiry: within MAX_LINE, so a journal netboot writes is never refused for a long line."""
    lease = Lease("ff:ff:ff:ff:ff:ff", "255.255.255.255", -1.7976931348623157e308, ".".join(["a" * 63] * 4)[:253],
                  b"\xff" * 255)
    assert len(journal._encode(lease)) <= journal.MAX_LINE
    store = Journal(tmp_path)
    store.load()
    store.record(lease)
    store.close()
    assert journal.read(tmp_path)[0] == {lease.mac: lease}


def whole_journal(d: Path) -> bytes:
    """A journal of three groups (A, B, C), as the server leaves it."""
    leases = open_leases(d)
    for i, mac in enumerate((A, B, C)):
        leases.commit(mac, f"192.0.2.{101 + i}", 100.0, "h")
        leases.store.flush()
    leases.store.close()
    return (d / JOURNAL).read_bytes()


def start(d: Path) -> None:
    """What a server's start does with its state directory (netboot.dhcp.start_dhcp_server)."""
    store = Journal(d)
    try:
        Leases(POOL, store)
    finally:
        store.close()


def assert_one_line_error(d: Path, path: Path, line: int) -> None:
    """Reading and starting both refuse the journal in one short line naming it, and leave every file alone."""
    before = files(d)
    for read in (journal.read, start):
        with pytest.raises(NetbootError) as info:
            read(d)
        message = str(info.value)
        assert message.startswith(f"{path}: corrupt lease journal (line {line}: "), message[:300]
        assert "\n" not in message and len(message) < len(str(path)) + 400, message[:300]
        assert message.endswith("left as it is: repair or remove it to start")
    assert files(d) == before


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_record_in_the_torn_last_group_is_ignored(tmp_path: Path, hostile: bytes) -> None:
    path = tmp_path / JOURNAL
    path.write_bytes(whole_journal(tmp_path) + hostile + b"\n")
    assert set(journal.read(tmp_path)[0]) == {A, B, C}
    path.write_bytes(whole_journal(tmp_path / "again") + hostile)  # cut short before its newline too
    assert set(journal.read(tmp_path)[0]) == {A, B, C}
    again = open_leases(tmp_path)
    assert set(again.by_mac) == {A, B, C}
    again.store.close()
    assert hostile not in path.read_bytes()  # the start wrote a new base and an empty active journal


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_record_before_a_whole_group_is_a_clear_error(tmp_path: Path, hostile: bytes) -> None:
    whole = whole_journal(tmp_path)
    lines = whole.split(b"\n")
    path = tmp_path / JOURNAL
    path.write_bytes(b"\n".join([*lines[:3], hostile, b"commit 1 00000000", *lines[3:]]))
    assert_one_line_error(tmp_path, path, 4)


def test_a_hostile_base_is_a_clear_error(tmp_path: Path) -> None:
    """The compacted base is never torn: whatever follows its last group is corruption."""
    whole_journal(tmp_path)
    base = tmp_path / (JOURNAL + ".1")
    for hostile in HOSTILE.values():
        base.write_bytes(journal._header(0, 1) + hostile + b"\n")
        assert_one_line_error(tmp_path, base, 2)


@settings(max_examples=300, deadline=None)
@given(tail=st.one_of(
    st.binary(max_size=2000),
    st.lists(st.sampled_from([*HOSTILE.values(), RECORD + b'"h"', b"drop " + A.encode(), b"", b"\0" * 100]),
             max_size=4).map(b"\n".join),
).filter(lambda b: b"commit" not in b))
def test_whatever_follows_the_last_group_without_a_commit_line_is_ignored(
        tmp_path_factory: pytest.TempPathFactory, tail: bytes) -> None:
    """The documented recovery, for any bytes at all: a last group cut short (no commit line) is never more than
    a warning, and the groups before it are read."""
    d = tmp_path_factory.mktemp("torn")
    (d / JOURNAL).write_bytes(whole_journal(d) + tail)
    assert set(journal.read(d)[0]) == {A, B, C}


@settings(max_examples=500, deadline=None)
@given(data=st.data(), name=st.sampled_from([JOURNAL, JOURNAL + ".1", JOURNAL + ".2"]))
def test_any_damage_reads_or_is_the_one_line_error(tmp_path_factory: pytest.TempPathFactory,
                                                   data: st.DataObject, name: str) -> None:
    """A journal file with any span replaced by any bytes (or by a hostile record) reads, or is refused as a
    corrupt journal in one line: no other exception, whichever of the three files it is."""
    d = tmp_path_factory.mktemp("damaged")
    whole = whole_journal(d)
    if name != JOURNAL:
        os.rename(d / JOURNAL, d / name)
        (d / JOURNAL).write_bytes(journal._header(1, 0))  # the base holds generation 0: the others are read
    start = data.draw(st.integers(0, len(whole)))
    end = data.draw(st.integers(start, len(whole)))
    insert = data.draw(st.one_of(st.binary(max_size=200), st.sampled_from(list(HOSTILE.values()))))
    path = d / name
    path.write_bytes(whole[:start] + insert + whole[end:])
    try:
        journal.read(d)
    except NetbootError as e:
        message = str(e)
        assert message.startswith(f"{path}: corrupt lease journal (line "), message[:300]
        assert "\n" not in message and len(message) < len(str(path)) + 400, message[:300]


def test_compaction_folds_the_journal_into_the_base_in_the_background(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "COMPACT_AFTER", 20)
    pool = Pool(IPv4Address("192.0.2.100"), IPv4Address("192.0.2.199"), IPv4Network("192.0.2.0/24"))
    leases = open_leases(tmp_path, pool)
    now = 100.0
    for round_ in range(10):
        for i in range(8):
            mac = f"52:54:00:00:05:{i:02x}"
            leases.commit(mac, leases.choose(mac, None, now, {}), now, f"r{round_}")
        leases.store.flush()
        leases.store.settle()  # each rotation folded before the next round: as many rotations whatever the load
        now += 10
    leases.store.close()
    names = set(files(tmp_path))
    assert JOURNAL + ".1" in names and JOURNAL + ".2" not in names
    active = (tmp_path / JOURNAL).read_bytes().splitlines()
    generation = int(active[0].split(b"generation=")[1].split()[0])
    assert generation >= 3  # two rotations at least: 80 records, a rotation past 20
    assert len([line for line in active if line.startswith(b"lease ")]) <= 80 - 2 * 24
    by_mac = journal.read(tmp_path)[0]
    assert by_mac == leases.by_mac and {x.hostname for x in by_mac.values()} == {"r9"}


def test_a_compaction_stopped_halfway_loses_nothing(tmp_path: Path) -> None:
    """A base that already holds the rotated journal (the compaction stopped before removing it): read once."""
    leases = open_leases(tmp_path)
    leases.commit(A, "192.0.2.101", 100.0)
    leases.store.flush()
    leases.commit(A, "192.0.2.102", 200.0)  # A moves: replaying the old journal over it would undo that
    leases.store.flush()
    leases.store.close()
    active = tmp_path / JOURNAL
    os.rename(active, tmp_path / (JOURNAL + ".2"))
    by_mac, newest = journal.read(tmp_path)
    (tmp_path / (JOURNAL + ".1")).write_bytes(journal._base(by_mac.values(), newest))
    active.write_bytes(journal._header(newest + 1, 0))
    assert journal.read(tmp_path)[0] == {A: Lease(A, "192.0.2.102", 3800.0)}
    again = open_leases(tmp_path)
    assert again.by_mac[A].ip == "192.0.2.102" and not (tmp_path / (JOURNAL + ".2")).exists()
    again.store.close()


def test_the_lease_file_of_earlier_versions_is_converted(tmp_path: Path) -> None:
    legacy = tmp_path / LEGACY
    legacy.write_text(json.dumps({"format": "netboot-dhcp-leases", "version": 1, "leases": [
        {"mac": A, "ip": "192.0.2.101", "expires": 5000.0, "hostname": "node1"},
        {"mac": B, "ip": "192.0.2.102", "expires": 6000.0, "hostname": ""}]}, indent=1))
    leases = open_leases(tmp_path)
    assert leases.by_mac == {A: Lease(A, "192.0.2.101", 5000.0, "node1"), B: Lease(B, "192.0.2.102", 6000.0)}
    assert not legacy.exists() and journal.read(tmp_path)[0] == leases.by_mac
    assert leases.choose(C, None, 100.0, {}) == "192.0.2.103"
    leases.store.close()


def test_a_lease_file_beside_a_journal_is_what_was_converted(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    leases.commit(A, "192.0.2.101", 100.0)
    leases.store.close()
    (tmp_path / LEGACY).write_text('{"format": "netboot-dhcp-leases", "version": 1, "leases": []}')
    again = open_leases(tmp_path)  # the conversion stopped before removing it: the journal is newer
    assert set(again.by_mac) == {A} and not (tmp_path / LEGACY).exists()
    again.store.close()


LEGACY_HEAD = '{"format": "netboot-dhcp-leases", "version": 1, "leases": '


@pytest.mark.parametrize("content", [
    "{not json", '{"format": "something else"}', '{"format": "netboot-dhcp-leases", "version": 9, "leases": []}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "zz", "ip": "192.0.2.1", "expires": 1}]}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "52:54:00:00:00:01", "ip": "x", '
    '"expires": 1}]}',
    '{"format": "netboot-dhcp-leases", "version": 1, "leases": [{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", '
    '"expires": 1}, {"mac": "52:54:00:00:00:02", "ip": "192.0.2.1", "expires": 1}]}',
    "\udcff",
    # Hostile: once a RecursionError, an AttributeError, an OverflowError, or a conversion into a journal that
    # the next start refused (a NaN or infinite expiry, a host name longer than a journal line).
    *(pytest.param(LEGACY_HEAD + body, id=name) for name, body in {
        "brackets": "[" * 100_000,
        "a MAC that is a number": '[{"mac": 5, "ip": "192.0.2.1", "expires": 1}]}',
        "an expiry past float": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": 1' + "0" * 400 + "}]}",
        "a NaN expiry": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": NaN}]}',
        "an infinite expiry": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": Infinity}]}',
        "an expiry of true": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": true}]}',
        "a hostname list": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": 1, "hostname": ["x"]}]}',
        "a long hostname": '[{"mac": "52:54:00:00:00:01", "ip": "192.0.2.1", "expires": 1, "hostname": "'
                           + "h" * 5000 + '"}]}',
        "a long MAC": '[{"mac": "' + "a" * 100_000 + '", "ip": "192.0.2.1", "expires": 1}]}',
    }.items()),
])
def test_a_corrupt_lease_file_is_a_clear_error_and_is_left_alone(tmp_path: Path, content: str) -> None:
    path = tmp_path / LEGACY
    path.write_bytes(content.encode(errors="surrogateescape"))
    before = files(tmp_path)
    with pytest.raises(NetbootError) as info:
        start(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: corrupt lease state (") or message.startswith(f"cannot read the lease state "
                                                                                         f"{path}: "), message[:300]
    assert "\n" not in message and len(message) < len(str(path)) + 400, message[:300]
    assert files(tmp_path) == before  # nothing written, nothing converted


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)


# An entry as earlier versions wrote it (or in another spelling), half the time with one field replaced by any
# JSON value.
LEGACY_ENTRY = st.fixed_dictionaries({
    "mac": st.sampled_from([*(f"52:54:00:00:00:{i:02x}" for i in range(8)), C.upper(), C.replace(":", "-")]),
    "ip": st.sampled_from([f"192.0.2.{i}" for i in range(100, 108)]),
    "expires": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(), st.integers()),
}, optional={"hostname": st.sampled_from(["", "node1", "h" * 5000])}).flatmap(
    lambda entry: st.one_of(st.just(entry), st.sampled_from(sorted(entry)).flatmap(
        lambda key: JSON.map(lambda value: {**entry, key: value}))))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(LEGACY_ENTRY, max_size=3))
def test_a_lease_file_converts_into_a_journal_that_reads_back_or_is_refused(
        tmp_path_factory: pytest.TempPathFactory, entries: list[dict]) -> None:
    """Whatever the entries of a lease file of earlier versions hold: it is refused in one line (left as it is),
    or converted into a journal that the next start reads back as the same leases."""
    d = tmp_path_factory.mktemp("legacy")
    (d / LEGACY).write_text(json.dumps({"format": "netboot-dhcp-leases", "version": 1, "leases": entries}))
    store = Journal(d)
    try:
        loaded = store.load()
    except NetbootError as e:
        message = str(e)
        assert message.startswith(f"{d / LEGACY}: corrupt lease state (") and "\n" not in message, message[:300]
        assert (d / LEGACY).exists() and not (d / JOURNAL).exists()
        return
    finally:
        store.close()
    assert not (d / LEGACY).exists()
    assert journal.read(d)[0] == {lease.mac: lease for lease in loaded}


def test_a_failed_write_leaves_the_journal_whole(tmp_path: Path) -> None:
    leases = open_leases(tmp_path)
    leases.commit(A, "192.0.2.101", 100.0)
    leases.store.flush()
    leases.commit(B, "192.0.2.102", 100.0)
    batch = leases.store.take()
    fd = leases.store._fd
    leases.store._fd = os.open(os.devnull, os.O_RDONLY)  # a write that fails (EBADF)
    with pytest.raises(OSError):
        leases.store.write(batch)
    os.close(leases.store._fd)
    leases.store._fd = fd
    leases.store.restore(batch)
    leases.commit(C, "192.0.2.103", 100.0)
    leases.store.flush()  # what failed goes with the next group
    assert set(journal.read(tmp_path)[0]) == {A, B, C}
    leases.store.close()


def test_two_servers_cannot_share_a_state_directory(tmp_path: Path) -> None:
    state = Journal(tmp_path)
    with pytest.raises(NetbootError, match="in use by another netboot serve"):
        Journal(tmp_path)
    state.close()
    Journal(tmp_path).close()


def test_range_syntax() -> None:
    assert Pool.parse_range("192.0.2.100-192.0.2.199") == (IPv4Address("192.0.2.100"), IPv4Address("192.0.2.199"))
    for bad in ("192.0.2.100", "192.0.2.199-192.0.2.100", "a-b", "192.0.2.1-"):
        with pytest.raises(NetbootError, match="--dhcp"):
            Pool.parse_range(bad)
