"""Protocol numbers, names, ports and product strings: each fact stated once.

Both daemons and every front end import these; nothing else in the tree may spell
one of them again (a test greps for second copies).
"""

from __future__ import annotations

from typing import Final

VERSION: Final = "0.1.0"
PRODUCT: Final = f"igdpcp/{VERSION}"
# SERVER header of SSDP, HTTP and GENA answers (UPnP Device Architecture 2.0 §1.1.3).
SERVER: Final = f"Linux UPnP/1.1 {PRODUCT}"

TCP: Final = 6
UDP: Final = 17
PROTO_NAMES: Final[dict[int, str]] = {TCP: "TCP", UDP: "UDP"}  # UPnP spelling
PROTO_NUMBERS: Final[dict[str, int]] = {v: k for k, v in PROTO_NAMES.items()}
PROTOCOLS: Final = (TCP, UDP)  # all that UPnP IGD can express

PCP_SERVER_PORT: Final = 5351  # RFC 6887 §19.1 (also NAT-PMP, RFC 6886 §3)
PCP_CLIENT_PORT: Final = 5350  # RFC 6887 §14.1.1: where clients hear ANNOUNCE
PCP_PORTS: Final = frozenset({PCP_CLIENT_PORT, PCP_SERVER_PORT})  # UDP ports never mapped (RFC 6887 §11.3)
PCP_MAX_PACKET: Final = 1100  # RFC 6887 §7
ALL_HOSTS: Final = "224.0.0.1"  # RFC 6887 §14.1.1 multicast ANNOUNCE

DISCARD_PORT: Final = 9  # RFC 6970 §4.2: probe port to learn the external address
PROBE_LIFETIME: Final = 60  # RFC 6970 §4.2, §5.7: short probe lifetime, RECOMMENDED 60 s
IGD2_MAX_LEASE: Final = 604800  # RFC 6970 §4.1: IGD:2 lease 0 means this

SSDP_GROUP: Final = "239.255.255.250"  # UDA 2.0 §1.1.2
SSDP_PORT: Final = 1900
