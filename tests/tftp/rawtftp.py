"""A raw TFTP peer for protocol checks no stock client exposes (exact bytes, TIDs, duplicates, aborts)."""

from __future__ import annotations

import socket

from netboot.tftp import packets


class Peer:
    def __init__(self, host: str = "127.0.0.1", timeout: float = 2.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(timeout)
        self.host = host

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, datagram: bytes, port: int) -> None:
        self.sock.sendto(datagram, (self.host, port))

    def request(self, port: int, filename: str, options: tuple[tuple[str, str], ...] = (), mode: str = "octet"
                ) -> None:
        self.send(packets.build_request(filename, mode, options), port)

    def receive(self) -> tuple[packets.Packet, int]:
        """The next packet and the port it came from; socket.timeout if none comes."""
        data, addr = self.sock.recvfrom(70000)
        return packets.parse(data), addr[1]

    def nothing_within(self, seconds: float) -> bool:
        timeout = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            self.sock.recvfrom(70000)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(timeout)
        return False

    def collect(self, quiet: float) -> list[tuple[packets.Packet, int]]:
        """Every packet that arrives until none has for `quiet` seconds, with the port it came from."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(quiet)
        got = []
        try:
            while True:
                got.append(self.receive())
        except TimeoutError:
            return got
        finally:
            self.sock.settimeout(timeout)

    def download(self, port: int, filename: str, options: tuple[tuple[str, str], ...] = ()) -> bytes:
        """A plain lock-step download; the blksize comes from the OACK when options were accepted."""
        self.request(port, filename, options)
        blksize, expected, data = 512, 1, bytearray()
        while True:
            packet, tid = self.receive()
            if isinstance(packet, packets.OptionAck):
                blksize = int(dict(packet.options).get("blksize", 512))
                self.send(packets.build_ack(0), tid)
                continue
            if isinstance(packet, packets.Error):
                raise RuntimeError(f"ERROR {packet.code}: {packet.message}")
            assert isinstance(packet, packets.Data)
            if packet.block == expected & 0xFFFF:
                data += packet.payload
                expected += 1
            self.send(packets.build_ack(packet.block), tid)
            if len(packet.payload) < blksize and packet.block == (expected - 1) & 0xFFFF:
                return bytes(data)
