#!/bin/sh
# OpenWrt CI's runtime test (.github/scripts/test_entrypoint.sh): test.sh PKG_NAME PKG_VERSION.
[ "$1" = python3-pyzmq ] || exit 0
# the extension loads, links the system libzmq >= 4.3, and has CURVE (libzmq-curve)
python3 -c 'import sys, zmq
assert zmq.pyzmq_version() == sys.argv[1].split("-")[0], zmq.pyzmq_version()
assert zmq.zmq_version_info() >= (4, 3) and zmq.has("curve")
a, b = zmq.Context.instance().socket(zmq.PAIR), zmq.Context.instance().socket(zmq.PAIR)
a.bind("inproc://t"); b.connect("inproc://t"); a.send(b"x"); assert b.recv() == b"x"' "$2"
