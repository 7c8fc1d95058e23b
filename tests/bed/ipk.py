"""Build the ipk as a user would and read it back with GNU tar (shared by the packaging and
install tests)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "packaging"
EPOCH = 1_700_000_000


def load_builder() -> ModuleType:
    """packaging/build-ipk as a module (it is a script: packaging/ is no Python package)."""
    loader = importlib.machinery.SourceFileLoader("igdpcp_build_ipk", str(PKG / "build-ipk"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look the module up by name
    loader.exec_module(mod)
    return mod


def build(out: Path, epoch: int = EPOCH, *extra: str) -> Path:
    """Run the documented build command as a user would; returns the ipk path."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
    res = subprocess.run([str(PKG / "build-ipk"), "--out", str(out), *extra], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (ipk,) = out.glob("*.ipk")
    return ipk


def member(ipk: Path, name: str) -> bytes:
    """One member of the outer tar, read by GNU tar (as OpenWrt's CI does: tar -xzOf)."""
    res = subprocess.run(["tar", "-xzOf", str(ipk), name], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def raw_headers(tar: bytes) -> list[tuple[str, bytes, bytes]]:
    """(name, typeflag, magic) of every header block, walked by hand (no tarfile)."""
    out, off = [], 0
    while off + 512 <= len(tar) and tar[off:off + 512] != b"\0" * 512:
        h = tar[off:off + 512]
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        out.append((h[:100].rstrip(b"\0").decode(), h[156:157], h[257:265]))
        off += 512 + (size + 511) // 512 * 512
    return out


def tar_list(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getmembers()


def extract(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """The bytes of one regular file in ``tar`` (a missing or non-file member fails the test)."""
    f = tar.extractfile(member)
    assert f is not None, member
    return f.read()


def group(pattern: str, text: str, flags: int = 0) -> str:
    """The first group of ``pattern``'s first match in ``text`` (no match fails the test)."""
    m = re.search(pattern, text, flags)
    assert m is not None, pattern
    return m[1]

