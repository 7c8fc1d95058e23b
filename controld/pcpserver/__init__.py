"""PCP (RFC 6887) and NAT-PMP (RFC 6886) servers for LAN hosts: sans-I/O protocol logic.

Datagrams in, typed "wanted" events or immediate answers out (``pcp.handle_datagram``);
outcomes from the mapping core in, answer bytes out (``pcp.respond``). No sockets and no
clocks here: the socket edge passes the epoch and the time in. Design: docs/lan-pcp.md.
"""
