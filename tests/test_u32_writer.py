"""The prepared element write a one-NF version swap makes (syscall.U32Writer), on a
real map: it writes what a plain update writes, keeps its arguments across writes, and
fails like one."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest

from nfctl.bpf import syscall

pytestmark = pytest.mark.kernel


@pytest.fixture
def array() -> Iterator[syscall.BpfMap]:
    fd = syscall.map_create(syscall.MAP_TYPE_IDS["array"], 4, 4, 8, name="nfctl_u32w")
    with syscall.BpfMap(fd) as bpf_map:
        yield bpf_map


def _value(bpf_map: syscall.BpfMap, key: int) -> int:
    raw = bpf_map.lookup(struct.pack("<I", key))
    assert raw is not None
    return int(struct.unpack("<I", raw[:4])[0])


def test_writes_land_where_a_plain_update_would(array: syscall.BpfMap) -> None:
    writer = syscall.U32Writer(array)
    for key, value in [(3, 7), (0, 0xFFFFFFFF), (3, 9), (7, 1)]:
        writer.write(key, value)
        assert _value(array, key) == value
    assert [_value(array, k) for k in range(8)] == [0xFFFFFFFF, 0, 0, 9, 0, 0, 0, 1]


def test_a_failed_write_raises_with_the_map_name_and_the_next_one_works(
    array: syscall.BpfMap,
) -> None:
    writer = syscall.U32Writer(array)
    with pytest.raises(syscall.BpfError) as raised:
        writer.write(8, 1)  # one past the array's last element
    assert raised.value.errno == errno.E2BIG
    assert "nfctl_u32w" in str(raised.value)
    writer.write(2, 5)
    assert _value(array, 2) == 5


def test_a_map_without_four_byte_keys_and_values_is_refused() -> None:
    fd = syscall.map_create(syscall.MAP_TYPE_IDS["hash"], 8, 4, 4, name="nfctl_u32w8")
    try:
        with pytest.raises(syscall.BpfError) as raised:
            syscall.U32Writer(syscall.BpfMap(fd))
        assert raised.value.errno == errno.EINVAL
    finally:
        os.close(fd)
