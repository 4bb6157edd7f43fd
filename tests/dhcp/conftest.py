"""Every DHCP message the tests in this folder parse or build goes through both codecs: netboot's own and
pyroute2's (reference_codec.py). They must parse a request the same or both refuse it, and build the same bytes."""

from __future__ import annotations

import pytest
import reference_codec

from netboot.dhcp import message


@pytest.fixture(autouse=True)
def both_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    parse, encode = message.parse, message.Reply.encode

    def checked_parse(data: bytes) -> message.Request:
        try:
            ours = parse(data)
        except message.Malformed as e:
            try:
                theirs = reference_codec.parse(data)
            except message.Malformed:
                raise e from None
            raise AssertionError(f"netboot refuses ({e}) what pyroute2 reads as {theirs}: {data.hex()}") from None
        assert reference_codec.parse(data) == ours, data.hex()
        return ours

    def checked_encode(reply: message.Reply) -> bytes:
        ours = encode(reply)
        assert reference_codec.encode(reply) == ours, reply
        return ours

    monkeypatch.setattr(message, "parse", checked_parse)
    monkeypatch.setattr(message.Reply, "encode", checked_encode)
