"""fw4's default ruleset for the bed's router (shared by the fw4 namespace tests).

tests/data/fw4-default.nft (OpenWrt fw4's generated default ruleset) adapted to the bed: its
interface names, no flowtable and no conntrack helpers, a guest zone beside lan and wan, and the
include files of packaging/fw4 spliced in where fw4 includes /usr/share/nftables.d/.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from tests.bed import testbed as tb
from tests.bed.natd import here

FW4_DEFAULT = here("data", "fw4-default.nft")
INCLUDES = here("..", "packaging", "fw4")
GUEST_IF = "br-guest"

# A guest zone as fw4 renders one for a guest network: its input rejected, forwarding only
# to wan, plus a lan -> guest forwarding (fw4's chains for it, in the shape of lan's and wan's).
GUEST_CHAINS = f"""
\tchain input_guest {{
\t\tjump reject_from_guest
\t}}

\tchain forward_guest {{
\t\tjump accept_to_wan comment "!fw4: Accept guest to wan forwarding"
\t\tjump reject_to_guest
\t}}

\tchain reject_from_guest {{
\t\tiifname "{GUEST_IF}" counter jump handle_reject comment "!fw4: reject guest IPv4/IPv6 traffic"
\t}}

\tchain reject_to_guest {{
\t\toifname "{GUEST_IF}" counter jump handle_reject comment "!fw4: reject guest IPv4/IPv6 traffic"
\t}}

\tchain accept_to_guest {{
\t\toifname "{GUEST_IF}" counter accept comment "!fw4: accept guest IPv4/IPv6 traffic"
\t}}
"""


def fw4_ruleset(includes: str = INCLUDES) -> str:
    """fw4-default.nft for the bed, with the include files of ``includes`` where fw4 puts them."""
    with open(FW4_DEFAULT) as f:
        text = f.read()
    text = re.sub(r"\tflowtable ft \{.*?\n\t\}\n", "", text, flags=re.S)
    text = re.sub(r"\tct helper \S+ \{.*?\n\t\}\n", "", text, flags=re.S)
    text = re.sub(r"\tchain helper_lan \{.*?\n\t\}\n", "", text, flags=re.S)
    text = "\n".join(line for line in text.splitlines()
                     if "flow offload" not in line and "jump helper_lan" not in line
                     and "/etc/nftables.d" not in line) + "\n"
    text = text.replace('"pppoe-wan"', f'"{tb.ROUTER_WAN_IF}"').replace('"br-lan"', f'"{tb.ROUTER_LAN_IF}"')
    for base in ("input", "forward"):  # the guest zone's jump, after wan's
        text = re.sub(rf'(\n\t\tiifname "{tb.ROUTER_WAN_IF}" jump {base}_wan [^\n]*)',
                      rf'\1\n\t\tiifname "{GUEST_IF}" jump {base}_guest', text)
    text = text.replace("\n\t#\n\t# NAT rules", GUEST_CHAINS + "\n\t#\n\t# NAT rules")
    text = text.replace("\tchain forward_lan {\n", "\tchain forward_lan {\n\t\tjump accept_to_guest comment "
                        '"!fw4: Accept lan to guest forwarding"\n')
    for position, chain, path in include_files(includes):
        text = splice(text, position, chain, f'include "{path}"')
    return text


def include_files(root: str) -> Iterator[tuple[str, str | None, str]]:
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".nft"):
                pos, *chain = os.path.relpath(dirpath, root).split(os.sep)
                yield pos, (chain[0] if chain else None), os.path.join(dirpath, name)


def splice(text: str, position: str, chain: str | None, line: str) -> str:
    """Insert ``line`` where fw4's ruleset template includes ``position``/``chain``."""
    lines = text.splitlines()
    if position in ("table-pre", "table-post"):
        first_chain = next(i for i, x in enumerate(lines) if x.startswith("\tchain "))
        table_end = max(i for i, x in enumerate(lines) if x == "}")
        at = first_chain if position == "table-pre" else table_end
        return "\n".join(lines[:at] + ["\t" + line] + lines[at:]) + "\n"
    start = lines.index(f"\tchain {chain} {{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "\t}")
    if position == "chain-pre":  # after the hook line and the loopback accept
        at = start + 1
        while at < end and (lines[at].strip().startswith("type ") or not lines[at].strip()
                            or '"lo" accept' in lines[at]):
            at += 1
    else:  # chain-post: before the zone's final verdict jump (forward: before handle_reject)
        at = end
        last = lines[end - 1].strip()
        if (chain == "forward" and last.startswith("jump handle_reject")) or \
                (re.match(r"(input|output|forward)_\w+$", chain or "") and re.match(r"jump \w+_(from|to)_", last)):
            at = end - 1
    return "\n".join(lines[:at] + ["\t\t" + line] + lines[at:]) + "\n"
