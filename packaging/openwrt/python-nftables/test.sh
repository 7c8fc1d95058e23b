#!/bin/sh
# OpenWrt CI's runtime test (.github/scripts/test_entrypoint.sh): test.sh PKG_NAME PKG_VERSION.
[ "$1" = python3-nftables ] || exit 0
# the binding finds libnftables.so.1 and speaks JSON (nftables-json)
python3 -c 'import json, nftables
n = nftables.Nftables()
n.set_json_output(True)
rc, out, err = n.cmd("list tables")
assert rc == 0, err
json.loads(out)'
