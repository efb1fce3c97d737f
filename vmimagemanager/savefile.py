"""The head of a libvirt QEMU save file (virDomainSave), rewritten before each restore.

A save file is a header, a data area (the domain's XML, NUL-terminated, and a save cookie,
padded with zeros) and QEMU's migration stream. libvirt 9.0 restores a state only as the
domain the file's XML names (another name, UUID or VM generation ID in the restore's XML is
refused by its ABI check), so one saved state could only ever run as one domain. A snapshot
start (node/snapshots.py) writes the whole head itself instead: the header and a data area
holding exactly the restored domain's XML, built from the XML libvirt gave when the state was
saved, never from what the file held. QEMU wrote the stream into this file, and a QEMU a guest
escaped into could have written anything anywhere in it; libvirtd (root) parses only the
head, which is ours. The stream stays where it is (header + data length): it is checked to
begin with QEMU's magic, and only an unprivileged QEMU reads it.

The layout is libvirt's (src/qemu/qemu_saveimage.h, version 2): magic "LibvirtQemudSave",
then uint32 version, data_len, was_running, format, cookieOffset and 14 unused, host order.
"""

from __future__ import annotations

import os
import struct

from .errors import VmimError

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("=16sIIIII14I")
VERSION = 2
FORMAT_RAW = 0
STREAM_MAGIC = b"QEVM"  # QEMU's savevm stream begins with it
MAX_DATA_LEN = 1 << 20  # libvirt's XML plus its 64 KiB of padding: far less


class SaveFileError(VmimError):
    """The file is not a raw libvirt QEMU save file this code can rewrite."""


def stream_offset(fd: int) -> int:
    """Where QEMU's stream begins in the save file open on `fd`: after the header and the data
    area, whose length the header says and which must be followed by QEMU's magic."""
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size:
        raise SaveFileError("the saved state is truncated (no header)")
    magic, version, data_len, _running, fmt, _cookie, *_ = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise SaveFileError("the saved state is not a libvirt QEMU save file of version 2")
    if fmt != FORMAT_RAW:
        raise SaveFileError(f"the saved state is compressed (format {fmt}); only raw is used")
    if not 0 < data_len <= MAX_DATA_LEN:
        raise SaveFileError(f"the saved state's header gives a data length of {data_len}")
    offset = HEADER.size + data_len
    if os.pread(fd, len(STREAM_MAGIC), offset) != STREAM_MAGIC:
        raise SaveFileError("the saved state has no QEMU stream where its header says")
    return offset


def write_head(fd: int, domain_xml: str) -> None:
    """Make the save file open on `fd` (read-write) restore as `domain_xml`, running: a header
    of ours and a data area holding only that XML (no cookie: libvirt takes the guest CPU from
    the XML), zero-padded up to the stream, which is not touched."""
    offset = stream_offset(fd)
    data_len = offset - HEADER.size
    xml = domain_xml.encode() + b"\0"
    if len(xml) > data_len:
        raise SaveFileError(f"the restored domain's XML ({len(xml)} bytes) does not fit the "
                            f"saved state's data area ({data_len} bytes)")
    header = HEADER.pack(MAGIC, VERSION, data_len, 1, FORMAT_RAW, 0, *([0] * 14))
    os.pwrite(fd, header + xml + b"\0" * (data_len - len(xml)), 0)
