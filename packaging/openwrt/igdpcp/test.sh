#!/bin/sh
# OpenWrt CI's runtime test (.github/scripts/test_entrypoint.sh): run on the device after
# 'opkg install' / 'apk add' as test.sh PKG_NAME PKG_VERSION; must exit 0.
[ "$1" = igdpcp ] || exit 0
for cmd in igdpcp-natd igdpcp-controld igdpcp; do
	"$cmd" --version | grep -qF "$2" || { echo "$cmd --version does not say $2"; exit 1; }
done
# every module the daemons import is installed (Depends are right), from the bytecode
PYTHONPATH=/usr/lib/igdpcp python3 -B -P -c 'import natd.main, controld.main, controld.cli' || exit 1
ls /usr/lib/igdpcp/natd/__pycache__/main.*.pyc >/dev/null || { echo "no bytecode"; exit 1; }
# off until enabled, as miniupnpd: installing starts nothing
[ "$(uci -q get igdpcp.service.enabled)" = 0 ] || { echo "enabled after install"; exit 1; }
for f in table-post/30-igdpcp.nft chain-pre/srcnat/30-igdpcp.nft; do
	[ -f "/usr/share/nftables.d/$f" ] || { echo "missing fw4 include $f"; exit 1; }
done
