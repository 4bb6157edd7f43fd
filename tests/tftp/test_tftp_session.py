"""The transfer state machine driven directly: negotiation, timers, windows, rollover, loss, duplication."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.tftp import BytesContent, packets
from netboot.tftp.packets import Ack, Data, Error, OptionAck, Request
from netboot.tftp.session import Outcome, Session, SessionConfig, negotiate

CONFIG = SessionConfig()


def rrq(*options: tuple[str, str], mode: str = "octet") -> Request:
    return Request(packets.RRQ, "f", mode, tuple(options))


def session(data: bytes, *options: tuple[str, str], mode: str = "octet", config: SessionConfig = CONFIG,
            blksize_limit: int | None = None) -> Session:
    return Session(rrq(*options, mode=mode), BytesContent(data), config, now=0.0, blksize_limit=blksize_limit)


def only(datagrams: list[bytes]) -> packets.Packet:
    assert len(datagrams) == 1, datagrams
    return packets.parse(datagrams[0])


# -- negotiation -------------------------------------------------------------------------------------------

def test_oack_lists_accepted_options_in_request_order() -> None:
    request = rrq(("windowsize", "4"), ("foo", "1"), ("timeout", "3"), ("tsize", "0"), ("blksize", "1468"))
    n = negotiate(request, size=1234, config=CONFIG)
    assert n.accepted == (("windowsize", "4"), ("timeout", "3"), ("tsize", "1234"), ("blksize", "1468"))
    assert (n.blksize, n.windowsize, n.timeout) == (1468, 4, 3.0)


@pytest.mark.parametrize(("asked", "granted"), [("8", 8), ("1468", 1468), ("65464", 65464), ("99999", 65464)])
def test_blksize_is_granted_up_to_the_maximum(asked: str, granted: int) -> None:
    assert negotiate(rrq(("blksize", asked)), 10, CONFIG).accepted == (("blksize", str(granted)),)


def test_blksize_is_clamped_to_the_configured_maximum_and_the_mtu() -> None:
    config = SessionConfig(max_blksize=4096)
    assert negotiate(rrq(("blksize", "8192")), 10, config).blksize == 4096
    assert negotiate(rrq(("blksize", "8192")), 10, config, blksize_limit=1468).blksize == 1468


@pytest.mark.parametrize("option", [("blksize", "7"), ("blksize", "x"), ("blksize", ""), ("blksize", "1e3"),
                                    ("timeout", "0"), ("timeout", "256"), ("windowsize", "0"),
                                    ("windowsize", "65536"), ("blksize", "9" * 5000), ("utimeout", "1000")])
def test_invalid_and_unknown_options_are_ignored(option: tuple[str, str]) -> None:
    s = session(b"x" * 600, option)
    assert s.negotiation.accepted == ()
    assert only(s.start(0.0)) == Data(1, b"x" * 512)  # no OACK: DATA 1 directly (RFC 2347)


def test_windowsize_is_clamped_and_tsize_left_out_in_netascii() -> None:
    n = negotiate(rrq(("windowsize", "500"), ("tsize", "0"), mode="netascii"), 10, CONFIG)
    assert n.accepted == (("windowsize", "64"),)


# -- lock-step transfer ------------------------------------------------------------------------------------

def test_plain_transfer_ends_with_a_short_block() -> None:
    s = session(b"a" * 1000)
    assert only(s.start(0.0)) == Data(1, b"a" * 512)
    assert only(s.receive(packets.build_ack(1), 0.1)) == Data(2, b"a" * 488)
    assert s.receive(packets.build_ack(2), 0.2) == []
    assert s.finished and s.outcome == Outcome.COMPLETE and s.bytes_sent == 1000 and s.deadline is None


def test_a_multiple_of_blksize_ends_with_an_empty_block() -> None:
    s = session(b"a" * 1024)
    s.start(0.0)
    s.receive(packets.build_ack(1), 0.0)
    assert only(s.receive(packets.build_ack(2), 0.0)) == Data(3, b"")
    s.receive(packets.build_ack(3), 0.0)
    assert s.outcome == Outcome.COMPLETE and s.bytes_sent == 1024


def test_options_wait_for_ack_0() -> None:
    s = session(b"b" * 100, ("blksize", "64"), ("tsize", "0"))
    assert only(s.start(0.0)) == OptionAck((("blksize", "64"), ("tsize", "100")))
    assert only(s.receive(packets.build_ack(0), 0.1)) == Data(1, b"b" * 64)


def test_duplicate_ack_sends_nothing_and_keeps_the_timer() -> None:
    # RFC 1123 4.2.3.1, the Sorcerer's Apprentice: only the timer retransmits.
    s = session(b"c" * 2000)
    s.start(0.0)
    s.receive(packets.build_ack(1), 0.5)
    deadline = s.deadline
    assert s.receive(packets.build_ack(1), 0.9) == []
    assert s.receive(packets.build_ack(0), 0.9) == []
    assert s.deadline == deadline


def test_ack_for_a_block_not_sent_is_ignored() -> None:
    s = session(b"c" * 2000)
    s.start(0.0)
    assert s.receive(packets.build_ack(3), 0.1) == []
    assert s.receive(packets.build_ack(65535), 0.1) == []
    assert only(s.receive(packets.build_ack(1), 0.2)) == Data(2, b"c" * 512)


def test_retransmission_backs_off_and_gives_up() -> None:
    s = session(b"d" * 2000, config=SessionConfig(timeout=1.0, max_timeout=4.0, retries=4))
    s.start(0.0)
    assert s.expire(0.5) == []  # not due yet
    times = []
    now = 0.0
    while not s.finished:
        assert s.deadline is not None
        now = s.deadline
        sent = s.expire(now)
        if sent:
            assert [packets.parse(d) for d in sent] == [Data(1, b"d" * 512)]
            times.append(now)
    assert times == [1.0, 3.0, 7.0, 11.0]  # waits of 1, 2, 4, then capped at 4
    assert s.outcome == Outcome.TIMEOUT and s.retransmissions == 4


def test_negotiated_timeout_is_the_retransmission_interval() -> None:
    s = session(b"e" * 10, ("timeout", "3"))
    s.start(0.0)
    assert s.deadline == 3.0
    assert only(s.expire(3.0)) == OptionAck((("timeout", "3"),))
    assert s.deadline == 6.0  # the interval the client asked for, without backoff
    assert only(s.expire(6.0)) == OptionAck((("timeout", "3"),))
    assert s.deadline == 9.0


def test_progress_resets_the_backoff() -> None:
    s = session(b"f" * 2000)
    s.start(0.0)
    s.expire(1.0)
    s.expire(3.0)
    s.receive(packets.build_ack(1), 3.5)
    assert s.deadline == 4.5


def test_idle_timeout_ends_a_transfer_without_progress() -> None:
    config = SessionConfig(timeout=1.0, max_timeout=1.0, retries=100, idle_timeout=5.0)
    s = session(b"f" * 2000, config=config)
    s.start(0.0)
    now = 0.0
    while not s.finished:
        assert s.deadline is not None
        now = s.deadline
        s.expire(now)
    assert s.outcome == Outcome.TIMEOUT and now == 5.0


def test_block_numbers_roll_over_to_zero() -> None:
    blocks = 65535 + 3
    data = random.Random(1).randbytes(8 * blocks)  # blksize 8: the rollover without a 32 MiB file
    s = session(data, ("blksize", "8"))
    s.start(0.0)
    received, wire = bytearray(), []
    out = s.receive(packets.build_ack(0), 0.0)
    while out:
        packet = only(out)
        assert isinstance(packet, Data)
        received += packet.payload
        wire.append(packet.block)
        out = s.receive(packets.build_ack(packet.block), 0.0)
    assert wire[65533:] == [65534, 65535, 0, 1, 2, 3]
    assert bytes(received) == data and s.outcome == Outcome.COMPLETE


# -- windows (RFC 7440) ------------------------------------------------------------------------------------

def blocks(datagrams: list[bytes]) -> list[int]:
    return [p.block for p in map(packets.parse, datagrams) if isinstance(p, Data)]


def test_window_is_sent_whole_and_restarts_after_the_acknowledged_block() -> None:
    s = session(b"g" * 512 * 20, ("windowsize", "4"))
    s.start(0.0)
    assert blocks(s.receive(packets.build_ack(0), 0.0)) == [1, 2, 3, 4]
    assert blocks(s.receive(packets.build_ack(2), 0.1)) == [3, 4, 5, 6]  # the client lost block 3
    assert s.retransmissions == 2
    assert blocks(s.receive(packets.build_ack(6), 0.2)) == [7, 8, 9, 10]
    assert s.receive(packets.build_ack(6), 0.3) == []  # duplicate: nothing
    assert blocks(s.expire(1.2)) == [7, 8, 9, 10]  # timer: the whole window again


def test_window_stops_at_the_last_block() -> None:
    s = session(b"h" * 512 * 5, ("windowsize", "16"))
    s.start(0.0)
    assert blocks(s.receive(packets.build_ack(0), 0.0)) == [1, 2, 3, 4, 5, 6]
    s.receive(packets.build_ack(6), 0.0)
    assert s.outcome == Outcome.COMPLETE and s.bytes_sent == 512 * 5


# -- netascii, errors, probes ------------------------------------------------------------------------------

def test_netascii_converts_line_ends_across_blocks() -> None:
    text = b"ab\ncd\r" * 200
    s = session(text, ("blksize", "16"), mode="netascii")
    s.start(0.0)
    got = bytearray()
    out = s.receive(packets.build_ack(0), 0.0)
    while out:
        packet = only(out)
        assert isinstance(packet, Data)
        got += packet.payload
        out = s.receive(packets.build_ack(packet.block), 0.0)
    assert bytes(got) == text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    assert s.bytes_sent == len(got)


def test_size_probe_then_error_8_is_a_normal_outcome() -> None:
    # EDK2 asks for tsize, reads it from the OACK, then refuses the OACK and asks again.
    s = session(b"i" * 5000, ("tsize", "0"), ("blksize", "1468"))
    assert only(s.start(0.0)) == OptionAck((("tsize", "5000"), ("blksize", "1468")))
    assert s.receive(packets.build_error(8, "User aborted"), 0.1) == []
    assert s.outcome == Outcome.SIZE_PROBE


def test_client_error_mid_transfer_aborts() -> None:
    s = session(b"j" * 5000)
    s.start(0.0)
    s.receive(packets.build_error(0, "TFTP Aborted"), 0.1)  # iPXE closing early
    assert s.outcome == Outcome.CLIENT_ABORT and "TFTP Aborted" in s.detail


class Shrinking(BytesContent):
    def read(self, offset: int, length: int) -> bytes:
        return super().read(offset, length)[: length // 2]


def test_a_file_that_shrinks_is_an_error_not_a_short_file() -> None:
    s = Session(rrq(), Shrinking(b"k" * 5000), CONFIG, now=0.0)
    assert only(s.start(0.0)) == Error(0, "read error")
    assert s.outcome == Outcome.READ_ERROR


def test_cancel_tells_the_peer() -> None:
    s = session(b"l" * 5000)
    s.start(0.0)
    assert only(s.cancel(0.5, "server shutting down")) == Error(0, "server shutting down")
    assert s.finished and s.cancel(0.6, "again") == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_noise_from_the_peer_never_raises_nor_derails(noise: list[bytes]) -> None:
    data = bytes(range(256)) * 10
    s = session(data, ("blksize", "100"), ("windowsize", "3"))
    s.start(0.0)
    s.receive(packets.build_ack(0), 0.0)
    for datagram in noise:
        s.receive(datagram, 0.0)
    if s.finished:  # the noise held an ERROR or the final ACK: a legitimate end
        return
    now = 0.0
    got: dict[int, bytes] = {}
    while not s.finished:
        now += 1.0
        for datagram in s.expire(now):  # retransmissions from the last acknowledged block
            packet = packets.parse(datagram)
            assert isinstance(packet, Data)
            got[packet.block] = packet.payload
        if got:
            s.receive(packets.build_ack(max(got)), now)
    assert s.outcome in (Outcome.COMPLETE, Outcome.TIMEOUT)


# -- loss and duplication ----------------------------------------------------------------------------------

@dataclass(order=True)
class _Event:
    time: float
    seq: int
    to_server: bool = field(compare=False)
    datagram: bytes = field(compare=False)


class LossyLink:
    """Both directions drop and duplicate packets at the given rates; one-way delay 1 ms (dups: +0.3 ms)."""

    def __init__(self, rng: random.Random, drop: float, dup: float) -> None:
        self.rng, self.drop, self.dup = rng, drop, dup
        self.queue: list[_Event] = []
        self.seq = 0

    def send(self, datagram: bytes, now: float, to_server: bool) -> None:
        if self.rng.random() < self.drop:
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for i in range(copies):
            self.seq += 1
            heapq.heappush(self.queue, _Event(now + 0.001 + i * 0.0003, self.seq, to_server, datagram))


class Client:
    """A receiver per RFC 1350/7440 that re-acknowledges eagerly: every out-of-order or repeated DATA gets an
    ACK of the last in-order block, exactly the behaviour that would set off the Sorcerer's Apprentice."""

    def __init__(self, blksize: int, windowsize: int) -> None:
        self.blksize, self.windowsize = blksize, windowsize
        self.expected, self.in_window, self.data, self.done = 1, 0, bytearray(), False
        self.timeout_at = 2.0
        self.last_ack = packets.build_ack(0)

    def receive(self, packet: packets.Packet, now: float) -> bytes | None:
        self.timeout_at = now + 2.0
        if isinstance(packet, OptionAck):
            return self.last_ack if self.expected == 1 else None
        assert isinstance(packet, Data)
        if packet.block == self.expected & 0xFFFF and not self.done:
            self.data += packet.payload
            self.expected += 1
            self.in_window += 1
            self.done = len(packet.payload) < self.blksize
            if self.done or self.in_window == self.windowsize:
                self.in_window = 0
                self.last_ack = packets.build_ack(packet.block)
                return self.last_ack
            return None
        self.in_window = 0
        self.last_ack = packets.build_ack(self.expected - 1)
        return self.last_ack


def simulate(seed: int, size: int, blksize: int, windowsize: int, drop: float, dup: float
             ) -> tuple[Session, Client, int, int]:
    rng = random.Random(seed)
    data = rng.randbytes(size)
    options = (("blksize", str(blksize)), ("windowsize", str(windowsize)), ("tsize", "0"))
    s = Session(rrq(*options), BytesContent(data), CONFIG, now=0.0)
    client = Client(blksize, windowsize)
    link = LossyLink(rng, drop, dup)
    now, data_sent, acked_before = 0.0, 0, -1
    for datagram in s.start(now):
        link.send(datagram, now, to_server=False)
    while not s.finished:
        assert now < 3600, "the transfer stalled"
        arrival = link.queue[0].time if link.queue else None
        candidates = [t for t in (s.deadline, client.timeout_at, arrival) if t]
        now = min(candidates)
        if link.queue and link.queue[0].time == now:
            event = heapq.heappop(link.queue)
            if event.to_server:
                block = packets.parse(event.datagram)
                replies = s.receive(event.datagram, now)
                if isinstance(block, Ack) and block.block == acked_before & 0xFFFF:
                    assert replies == [], "a duplicate ACK made the server send"
                if isinstance(block, Ack) and replies:
                    acked_before = block.block
            else:
                ack = client.receive(packets.parse(event.datagram), now)
                if ack is not None:
                    link.send(ack, now, to_server=True)
                continue
        elif now == s.deadline:
            replies = s.expire(now)
        else:
            client.timeout_at = now + 2.0
            link.send(client.last_ack, now, to_server=True)
            continue
        data_sent += sum(1 for r in replies if r[1] == packets.DATA)
        for datagram in replies:
            link.send(datagram, now, to_server=False)
    assert bytes(client.data) == data
    return s, client, data_sent, size // blksize + 1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("windowsize", "drop", "dup"), [(1, 0.05, 0.05), (1, 0.10, 0.10), (8, 0.05, 0.05),
                                                         (8, 0.10, 0.10)])
def test_loss_and_duplication_in_both_directions(seed: int, windowsize: int, drop: float, dup: float) -> None:
    s, client, data_sent, needed = simulate(seed, 300_000, 512, windowsize, drop, dup)
    assert s.outcome == Outcome.COMPLETE and client.done
    # No duplicate-ACK storm: a lost round costs one resend (or one window), never a doubling per ACK.
    # Lock-step: each block costs 1/(1-p) sends with p ~ 2*drop round losses; a window resends up to itself.
    bound = needed * (1.5 if windowsize == 1 else 1 + 2 * drop * windowsize)
    assert data_sent <= bound, f"{data_sent} DATA sent for {needed} blocks"


def test_lock_step_fast_path_agrees_with_the_general_path() -> None:
    data = random.Random(7).randbytes(512 * 5 + 100)
    fast, slow = session(data), session(data)
    assert fast.start(0.0) == slow.start(0.0)
    for block in range(1, 6):
        datagram = fast.next_block(block, block * 0.1)
        assert [datagram] == slow.receive(packets.build_ack(block), block * 0.1)
        assert fast.deadline == slow.deadline and fast.bytes_sent == slow.bytes_sent
    assert fast.next_block(6, 1.0) is None  # the final ACK is left to receive(), which ends the transfer
    assert fast.next_block(5, 1.0) is None  # so is a duplicate
    fast.cancel(1.0, "gone", tell_peer=False)
    assert fast.next_block(6, 1.0) is None  # and anything after the end
