"""Writing the machines file: tables added, replaced and removed with every comment and line around them kept, and
the file replaced whole, without losing what another writer saved meanwhile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from support import ROOT

from netboot.core.errors import NetbootError
from netboot.core.machines_file import NotListed, delete_machine, put_machine, rewrite

FILE = """\
# The lab's machines (kept by hand and by the API)
[profiles.rack]
dir = "out"   # the rack build

# node1: the database
[machines."52-54-00-00-00-01"]
profile = "rack"  # keep this comment
hostname = "node1"
role = "db"
# ip = "192.0.2.9"   (not yet)

# node2: the web server,
# on the second floor
[machines.525400000002]
profile = "rack"

# the end
"""


def test_a_new_machine_goes_after_the_others_and_nothing_else_moves() -> None:
    text, added = put_machine(FILE, "52:54:00:00:00:03", {"profile": "rack", "hostname": "node3",
                                                          "disks": {"root": "/dev/sda"}, "tags": ["a", "b"]})
    assert added
    assert text.startswith(FILE)
    assert text[len(FILE):] == ('\n[machines."52:54:00:00:00:03"]\nprofile = "rack"\nhostname = "node3"\n'
                                'disks = {root = "/dev/sda"}\ntags = ["a", "b"]\n')
    assert tomllib.loads(text)["machines"]["52:54:00:00:00:03"]["disks"] == {"root": "/dev/sda"}


def test_a_machine_replaced_in_place_keeps_its_comments_in_any_spelling() -> None:
    text, added = put_machine(FILE, "52:54:00:00:00:01", {"profile": "rack", "hostname": "db1", "ip": "192.0.2.7"})
    assert not added
    assert text == FILE.replace('hostname = "node1"\nrole = "db"\n', 'hostname = "db1"\nip = "192.0.2.7"\n')
    # The same table, nothing changed: the same text.
    assert put_machine(FILE, "52:54:00:00:00:02", {"profile": "rack"}) == (FILE, False)


def test_new_keys_go_after_the_last_key_in_its_indentation_before_sub_tables_and_comments() -> None:
    text = '[machines."52:54:00:00:00:09"]  # head\n  profile = "a"   # c\n  # tail\n'
    assert put_machine(text, "52:54:00:00:00:09", {"profile": "a", "hostname": "h", "tags": ["x"]})[0] == (
        '[machines."52:54:00:00:00:09"]  # head\n  profile = "a"   # c\n  hostname = "h"\n  tags = ["x"]\n'
        '  # tail\n')
    # A sub-table written as a table of its own: the new key is the machine's, not the sub-table's.
    text = '[machines."52:54:00:00:00:09"]\nprofile = "a"\n[machines."52:54:00:00:00:09".disks]\nroot = "x"\n'
    new = put_machine(text, "52:54:00:00:00:09", {"profile": "a", "disks": {"root": "x"}, "hostname": "h"})[0]
    assert new == text.replace('profile = "a"\n', 'profile = "a"\nhostname = "h"\n')
    # A table with no key yet: after its header, before its comments; a file without a last newline.
    text = '[machines."52:54:00:00:00:09"]\n# to come\n\n[machines.b]\nprofile = "a"'
    assert put_machine(text, "52:54:00:00:00:09", {"profile": "r"})[0] == text.replace("]\n#", ']\nprofile = "r"\n#')
    text = '[machines."52:54:00:00:00:09"]\nprofile = "a"'
    assert put_machine(text, "52:54:00:00:00:09", {"profile": "a", "ip": "192.0.2.9"})[0] == (
        text + '\nip = "192.0.2.9"\n')


def test_new_keys_of_a_machine_written_with_dotted_keys_are_dotted_too() -> None:
    text = '[machines]\n"52:54:00:00:00:09".profile = "a"\n'
    new = put_machine(text, "52:54:00:00:00:09", {"profile": "a", "hostname": "h"})[0]
    assert new == text + '"52:54:00:00:00:09".hostname = "h"\n'


def test_the_oldest_tomlkit_allowed_writes_the_same() -> None:
    """pyproject.toml's lowest tomlkit, installed beside the environment by `make venv`: this module's tests pass
    with it too (the environment itself has the newest, as a new user's does)."""
    pin = re.search(r'"tomlkit>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None, "pyproject.toml names no lowest tomlkit"
    oldest = Path(sys.prefix) / "tomlkit-oldest"
    assert (oldest / "tomlkit").is_dir(), f"{oldest} is missing: `make venv` installs tomlkit {pin[1]} there"
    env = {**os.environ, "PYTHONPATH": f"{oldest}:{ROOT}"}
    version = subprocess.run([sys.executable, "-c", "import tomlkit; print(tomlkit.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == pin[1]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "-k", "not oldest", __file__], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_file_without_machines_gets_them() -> None:
    text, added = put_machine('[profiles.rack]\ndir = "out"\n', "52:54:00:00:00:05", {"profile": "rack"})
    assert added and tomllib.loads(text) == {"profiles": {"rack": {"dir": "out"}},
                                             "machines": {"52:54:00:00:00:05": {"profile": "rack"}}}


def test_a_machine_removed_takes_its_own_comments_along() -> None:
    text = delete_machine(FILE, "52:54:00:00:00:02")
    assert text == FILE.replace("# node2: the web server,\n# on the second floor\n[machines.525400000002]\n"
                                'profile = "rack"\n\n', "")
    text = delete_machine(FILE, "52:54:00:00:00:01")
    assert text == FILE.replace('# node1: the database\n[machines."52-54-00-00-00-01"]\nprofile = "rack"  # keep this '
                                'comment\nhostname = "node1"\nrole = "db"\n# ip = "192.0.2.9"   (not yet)\n\n', "")
    with pytest.raises(NotListed, match="52:54:00:00:00:09 has no table"):
        delete_machine(FILE, "52:54:00:00:00:09")


def test_a_machine_added_then_removed_leaves_the_file_as_it_was() -> None:
    added = put_machine(FILE + "[machines.x]\n", "52:54:00:00:00:03", {"profile": "rack"})[0]
    assert delete_machine(added, "52:54:00:00:00:03") == FILE + "[machines.x]\n"


def test_a_comment_like_line_of_a_string_stays() -> None:
    text = '[machines.a]\nnote = """\n# not a comment\n"""\n[machines."52:54:00:00:00:01"]\nprofile = "x"\n'
    assert delete_machine(text, "52:54:00:00:00:01") == '[machines.a]\nnote = """\n# not a comment\n"""\n'


def test_rewrite_replaces_the_file_whole_or_not_at_all(tmp_path: Path) -> None:
    f = tmp_path / "machines.toml"
    f.write_text(FILE)
    f.chmod(0o640)
    before = os.stat(f)

    def refuse(text: str) -> None:
        raise NetbootError("machines.toml:3: no good")

    with pytest.raises(NetbootError, match="no good"):
        rewrite(f, lambda t: t + "# more\n", refuse)
    assert f.read_text() == FILE and os.stat(f).st_ino == before.st_ino  # untouched
    result, written = rewrite(f, lambda t: t + "# more\n", len)
    assert result == len(FILE) + 7
    assert f.read_text() == FILE + "# more\n" and os.stat(f).st_mode & 0o777 == 0o640
    assert (written.st_ino, written.st_mtime_ns, written.st_size) == (os.stat(f).st_ino, os.stat(f).st_mtime_ns,
                                                                      os.stat(f).st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["machines.toml"]  # no temporary file left


def test_a_hand_edit_saved_during_a_write_is_kept(tmp_path: Path) -> None:
    """A hand edit lands between the read and the swap (an editor saving by renaming): the edit is made again on
    it, and both are in the file."""
    f = tmp_path / "machines.toml"
    f.write_text(FILE)
    edits = []

    def edit(text: str) -> str:
        edits.append(text)
        if len(edits) == 1:  # the operator saves while netboot is checking its edit
            by_hand = tmp_path / "by-hand"
            by_hand.write_text(text + '\n[machines."52:54:00:00:00:0a"]\nprofile = "rack"  # by hand\n')
            by_hand.rename(f)
        return put_machine(text, "52:54:00:00:00:03", {"profile": "rack"})[0]

    rewrite(f, edit, tomllib.loads)
    machines = tomllib.loads(f.read_text())["machines"]
    assert {"52:54:00:00:00:0a", "52:54:00:00:00:03"} <= set(machines)
    assert "# by hand" in f.read_text() and len(edits) == 2


def test_a_hand_edit_that_the_write_cannot_go_onto_is_put_back(tmp_path: Path) -> None:
    f = tmp_path / "machines.toml"
    f.write_text(FILE)
    hand = FILE + "\n[profiles.new]\ndir = 1\n"

    def edit(text: str) -> str:
        if text == FILE:
            (tmp_path / "by-hand").write_text(hand)
            (tmp_path / "by-hand").rename(f)
        return text + "# netboot's\n"

    def check(text: str) -> None:
        if "dir = 1" in text:
            raise NetbootError("profiles.new: dir must be a directory")

    with pytest.raises(NetbootError, match="dir must be a directory"):
        rewrite(f, edit, check)
    assert f.read_text() == hand  # theirs, as they saved it


def test_writers_in_threads_lose_nothing(tmp_path: Path) -> None:
    """Several writers at once, each swapping its edit in without a lock between them: every edit is in."""
    f = tmp_path / "machines.toml"
    f.write_text(FILE)
    macs = [f"52:54:00:00:01:{i:02x}" for i in range(12)]

    def write(mac: str) -> None:
        rewrite(f, lambda text: put_machine(text, mac, {"profile": "rack"})[0], tomllib.loads)

    threads = [threading.Thread(target=write, args=(mac,)) for mac in macs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(macs) <= set(tomllib.loads(f.read_text())["machines"])
    assert f.read_text().startswith(FILE)
