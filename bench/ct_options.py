#!/usr/bin/env python3
"""How to find a deleted forward's conntrack entries among many unrelated ones: the options
measured on the kernel at hand, in a scratch network namespace (prints figures, asserts nothing).

30,000 unrelated UDP entries (mark 0) and N forwarded ones (natd.nft.CT_MARK set, one per
forward). For N deleted forwards, the time to find their entries by:
- full dump decoded in Python (what natd did before; pyroute2 was slower still);
- one dump the kernel filters on the mark (CTA_MARK/CTA_MARK_MASK), then Python matches (natd now);
- one dump per forward the kernel filters on the original tuple (CTA_FILTER, Linux >= 5.8).

Run as root:  .venv/bin/python bench/ct_options.py
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natd import ctnetlink  # noqa: E402
from natd.nft import CT_MARK  # noqa: E402
from shared import netlink as nl  # noqa: E402

CTA_TIMEOUT, CTA_FILTER, CTA_FILTER_ORIG_FLAGS = 7, 25, 1
F_IP_DST, F_PROTO_NUM, F_PROTO_DST_PORT = 1 << 1, 1 << 3, 1 << 5
WAN = "100.64.0.2"


def insert(s: socket.socket, entries: list[tuple[ctnetlink.CtTuple, ctnetlink.CtTuple, int]]) -> None:
    for i in range(0, len(entries), 500):
        s.send(b"".join(nl.message(ctnetlink.IPCTNL_MSG_CT_NEW, nl.NLM_F_REQUEST | 0x400, j + 1,
                                   struct.pack("!BBH", 2, 0, 0) + ctnetlink.encode_tuple(1, o)
                                   + ctnetlink.encode_tuple(2, r) + nl.attr(CTA_TIMEOUT, struct.pack("!I", 600))
                                   + nl.attr(ctnetlink.CTA_MARK, struct.pack("!I", m)))
                        for j, (o, r, m) in enumerate(entries[i:i + 500])))


def dump(s: socket.socket, req: bytes) -> list[ctnetlink.CtEntry]:
    s.send(req)
    out: list[ctnetlink.CtEntry] = []
    while True:
        for m in nl.messages(s.recv(1 << 16)):
            if m.type in (nl.NLMSG_DONE, nl.NLMSG_ERROR):
                return out
            e = ctnetlink.decode_entry(m)
            if e:
                out.append(e)


def filter_request(wport: int) -> bytes:
    t = ctnetlink.CtTuple(17, "0.0.0.0", WAN, 0, wport)
    orig = nl.nested(1, nl.nested(1, nl.attr(2, socket.inet_aton(t.dst))),
                     nl.nested(2, nl.attr(1, bytes([17])), nl.attr(3, struct.pack("!H", wport))))
    flags = struct.pack("=I", F_IP_DST | F_PROTO_NUM | F_PROTO_DST_PORT)
    return nl.message(ctnetlink.IPCTNL_MSG_CT_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 1, struct.pack("!BBH", 2, 0, 0)
                      + orig + nl.nested(CTA_FILTER, nl.attr(CTA_FILTER_ORIG_FLAGS, flags)))


def run(unrelated: int, n: int) -> None:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctnetlink.NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    T = ctnetlink.CtTuple
    other = [(T(17, f"10.200.{(i >> 8) & 255}.{i & 255}", "198.51.100.1", 1024 + (i >> 16), 53),
              T(17, "198.51.100.1", f"10.200.{(i >> 8) & 255}.{i & 255}", 53, 1024 + (i >> 16)), 0)
             for i in range(unrelated)]
    fwd = [(T(17, "198.51.100.9", WAN, 40000, 20000 + i), T(17, "192.168.1.2", "198.51.100.9", 10000 + i, 40000),
            CT_MARK) for i in range(n)]
    insert(s, other + fwd)
    time.sleep(0.2)
    t = time.perf_counter()
    full = dump(s, nl.message(ctnetlink.IPCTNL_MSG_CT_GET, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 1,
                              struct.pack("!BBH", 2, 0, 0)))
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    marked = dump(s, ctnetlink.dump_request(2, CT_MARK, CT_MARK))
    t_mark = time.perf_counter() - t
    t = time.perf_counter()
    found = sum(len(dump(s, filter_request(20000 + i))) for i in range(n))
    t_filter = time.perf_counter() - t
    print(f"unrelated={unrelated:>6} forwards={n}: full dump in Python {t_full * 1e3:.1f} ms ({len(full)} entries); "
          f"mark-filtered dump {t_mark * 1e3:.2f} ms ({len(marked)}); "
          f"{n} CTA_FILTER dumps {t_filter * 1e3:.1f} ms ({found}, {t_filter / n * 1e3:.2f} ms each)")


def main() -> int:
    ns = f"ctopt{uuid.uuid4().hex[:6]}"
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        for unrelated in (0, 30_000):
            subprocess.run(["conntrack", "-F"], capture_output=True)
            run(unrelated, 500)
        return 0
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inside"],
                              timeout=300).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
