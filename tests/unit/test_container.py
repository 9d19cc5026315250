"""The strict container reader: what it accepts, and every hostile archive it must refuse.

SECURITY-MATRIX rows 35-39 (archive attacks) apply to the container itself; each case is crafted
with the standard library's tarfile, the way an attacker would.
"""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.container import (
    BLOCK,
    ContainerReader,
    ContainerWriter,
    check_relative_path,
)
from shared.errors import ContainerError
from tests.unit.tarcraft import regular, special, write_entries


def read_all(data: bytes) -> list[tuple[str, bytes]]:
    reader = ContainerReader(io.BytesIO(data))
    return [(m.name, reader.read_member(m, max_bytes=1 << 20)) for m in reader]


def refused(data: bytes) -> ContainerError:
    with pytest.raises(ContainerError) as info:
        read_all(data)
    return info.value


def test_round_trip_is_byte_identical_and_streams():
    out = io.BytesIO()
    writer = ContainerWriter(out)
    writer.add_bytes("manifest.json", b"{}")
    writer.add_stream("payload/big.bin", 3 * BLOCK + 7, io.BytesIO(b"z" * (3 * BLOCK + 7)))
    writer.close()
    data = out.getvalue()
    assert read_all(data) == [("manifest.json", b"{}"), ("payload/big.bin", b"z" * (3 * BLOCK + 7))]
    again = io.BytesIO()
    w2 = ContainerWriter(again)
    w2.add_bytes("manifest.json", b"{}")
    w2.add_stream("payload/big.bin", 3 * BLOCK + 7, io.BytesIO(b"z" * (3 * BLOCK + 7)))
    w2.close()
    assert again.getvalue() == data  # reproducible: no timestamps, owners or modes vary

    chunks: list[int] = []
    reader = ContainerReader(io.BytesIO(data))
    for member in reader:
        if member.name.endswith("big.bin"):
            reader.stream_member(member, lambda c: chunks.append(len(c)))
    assert sum(chunks) == 3 * BLOCK + 7


def test_standard_tar_of_regular_files_is_accepted():
    data = write_entries([regular("a/b.txt", b"hello"), regular("c.bin", b"\0" * 600)])
    assert read_all(data) == [("a/b.txt", b"hello"), ("c.bin", b"\0" * 600)]


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../evil.py", "'..'"),  # row 35: zip slip
        ("payload/../../etc/passwd", "'..'"),
        ("/etc/passwd", "absolute"),
        ("payload//x", "''"),
        ("payload/./x", "'.'"),
        ("payload\\..\\x", "component"),
        ("-rf", "component"),
        (".hidden", "component"),
        ("payload/model.onnx\n", "component"),
    ],
)
def test_unsafe_names_are_refused(name, fragment):
    err = refused(write_entries([regular(name, b"x")]))
    assert fragment in str(err)
    assert err.check == "path"


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        (tarfile.SYMTYPE, "symbolic link"),  # row 36
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "character device"),  # row 37
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
        (tarfile.DIRTYPE, "directory"),
    ],
)
def test_non_regular_members_are_refused(kind, label):
    err = refused(write_entries([special("payload/d", kind, linkname="../outside")]))
    assert label in str(err)
    assert err.check == "member-type"


def test_two_step_symlink_escape_is_refused_at_the_link():
    # row 36: "d -> ../outside" then "d/pwn": the link itself never gets through
    data = write_entries(
        [
            special("payload/d", tarfile.SYMTYPE, linkname="../outside"),
            regular("payload/d/pwn", b"x"),
        ]
    )
    err = refused(data)
    assert "'payload/d': symbolic link -> '../outside'" in str(err)


def test_hardlink_to_system_file_is_refused():
    err = refused(write_entries([special("payload/p", tarfile.LNKTYPE, linkname="/etc/passwd")]))
    assert "hard link -> '/etc/passwd'" in str(err)


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1777])
def test_setuid_setgid_sticky_modes_are_refused(mode):
    err = refused(write_entries([regular("payload/run", b"#!/bin/sh", mode=mode)]))
    assert err.check == "mode"
    assert f"{mode:04o}" in str(err)


def test_pax_headers_are_refused():
    # A PAX header can carry any size of data; the reader never parses one.
    info, data = regular("payload/" + "n" * 120, b"x")
    err = refused(write_entries([(info, data)], fmt=tarfile.PAX_FORMAT))
    assert "PAX extended header" in str(err)


def test_gnu_format_and_its_long_names_are_refused():
    info, data = regular("payload/" + "n" * 120, b"x")
    err = refused(write_entries([(info, data)], fmt=tarfile.GNU_FORMAT))
    assert "GNU tar format is not supported" in str(err)


@pytest.mark.parametrize(("first", "second"), [("model.bin", "model.bin"), ("A.bin", "a.bin")])
def test_duplicate_and_case_colliding_names_are_refused(first, second):
    # row 39
    err = refused(write_entries([regular(first, b"one"), regular(second, b"two")]))
    assert err.check == "duplicate"
    assert repr(second) in str(err)


def test_member_count_bomb_stops_at_the_cap():
    # row 38: 10^6 empty members would be cheap to send; the reader stops at its cap.
    entries = [regular(f"f{i}", b"") for i in range(50)]
    reader = ContainerReader(io.BytesIO(write_entries(entries)), max_members=10)
    with pytest.raises(ContainerError, match="more than 10 members"):
        for member in reader:
            reader.read_member(member, max_bytes=0)


def test_read_member_refuses_oversize_before_reading():
    reader = ContainerReader(io.BytesIO(write_entries([regular("big", b"x" * 5000)])))
    member = next(iter(reader))
    with pytest.raises(ContainerError, match="5000 bytes exceeds the limit of 100"):
        reader.read_member(member, max_bytes=100)


def test_compressed_archives_are_not_containers():
    import gzip

    err = refused(gzip.compress(write_entries([regular("a", b"x")])))
    assert err.check in ("header", "truncated")


@pytest.mark.parametrize("cut", [100, BLOCK, BLOCK + 3, 2 * BLOCK, -BLOCK - 1])
def test_truncation_anywhere_is_refused(cut):
    data = write_entries([regular("a.bin", b"a" * 700), regular("b.bin", b"b" * 10)])
    err = refused(data[:cut] if cut > 0 else data[: len(data) + cut - 1024 * 8])
    assert err.check == "truncated"
    assert "truncated" in str(err)


def test_missing_end_of_archive_marker_is_truncation():
    out = io.BytesIO()
    writer = ContainerWriter(out)
    writer.add_bytes("a", b"x")  # no close(): no end-of-archive marker
    assert refused(out.getvalue()).check == "truncated"


def test_data_after_the_end_marker_is_refused():
    out = io.BytesIO()
    writer = ContainerWriter(out)
    writer.add_bytes("a", b"x")
    writer.close()
    err = refused(out.getvalue() + b"evil")
    assert err.check == "trailing"


def test_header_checksum_is_checked():
    data = bytearray(write_entries([regular("a.bin", b"x")]))
    data[0] = ord("b")  # rename the member without fixing the checksum
    err = refused(bytes(data))
    assert "checksum mismatch" in str(err)


def test_base256_sizes_are_refused():
    data = bytearray(write_entries([regular("a.bin", b"x")]))
    data[124] = 0x80  # base-256 size marker
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + 8 * 0x20 + sum(data[156:BLOCK]))
    assert "base-256" in str(refused(bytes(data)))


@pytest.mark.parametrize(
    "good", ["model.onnx", "openvino/model.xml", "v1.2+cpu/w@2=x,y.bin", "_private/a"]
)
def test_check_relative_path_accepts_ordinary_names(good):
    assert check_relative_path(good) == good


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4 * BLOCK))
def test_random_bytes_only_ever_raise_container_error(data):
    try:
        read_all(data)
    except ContainerError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_archives_only_ever_raise_container_error(data):
    base = bytearray(write_entries([regular("a.bin", b"a" * 700), regular("b/c.txt", b"hi")]))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    try:
        read_all(bytes(base))
    except ContainerError:
        pass
