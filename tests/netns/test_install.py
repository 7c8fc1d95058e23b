"""Install test: build the ipk, install it into a staged root the way opkg does, run the
INSTALLED daemons in the namespace test bed (controld in its own namespace) through both
NATs, then remove it and find only the (changed) conffile left.

opkg facts (opkg-lede's libbb/unarchive.c, OpenWrt's include/package-pack.mk): the outer gzip'd tar is scanned for
control.tar.gz / data.tar.gz; control members land in /usr/lib/opkg/info/<pkg>.<member>;
the data tar is unpacked at the root; postinst runs with IPKG_INSTROOT set for an image
root and must then do nothing; on removal prerm runs, every listed file is deleted except a
conffile whose checksum changed (opkg_remove.c), then postrm runs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bed import testbed as tb
from tests.bed.ipk import ROOT, build, member, raw_headers
from tests.bed.natd import wait_until
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

PKG = "igdpcp"
PAYLOAD = b"igdpcp: installed from the ipk, through NAT1 and NAT2"
# Commands a maintainer script must not run at image-build time (§1.5): each shim records its call.
TRAPS = ("nft", "ubus", "uci", "logger", "service", "kill", "killall", "start-stop-daemon",
         "python3", "igdpcp-natd", "igdpcp-controld", "fw4", "reload_config")
# A stand-in for base-files' /lib/functions.sh: default_postinst/prerm source our *-pkg
# bodies as the real ones do and record the call (the real file exists only on OpenWrt).
FUNCTIONS_SH = """\
default_postinst() {
	echo "default_postinst $*" >> "$TRAPLOG"; . "${IPKG_INSTROOT}/usr/lib/opkg/info/igdpcp.postinst-pkg"
}
default_prerm() { echo "default_prerm $*" >> "$TRAPLOG"; . "${IPKG_INSTROOT}/usr/lib/opkg/info/igdpcp.prerm-pkg"; }
"""


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its mode and content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[p.relative_to(root).as_posix()] = (st.st_mode, digest)
    return out


class StagedOpkg:
    """opkg install/remove into an offline root, step by step as opkg-lede does them."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.info = root / "usr/lib/opkg/info"
        self.traps = work / "traps"
        self.traplog = work / "traps.log"

    def _shims(self) -> None:
        self.traps.mkdir(exist_ok=True)
        for name in TRAPS:
            shim = self.traps / name
            shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "$TRAPLOG"\n')
            shim.chmod(0o755)
        self.traplog.write_text("")

    def run_script(self, member: str, *args: str) -> subprocess.CompletedProcess:
        """Run a maintainer script as opkg does (sh -c), for an image root: IPKG_INSTROOT set."""
        self._shims()
        env = {"PATH": f"{self.traps}:/usr/sbin:/usr/bin:/sbin:/bin", "IPKG_INSTROOT": str(self.root),
               "PKG_ROOT": str(self.root), "PKG_UPGRADE": "0", "TRAPLOG": str(self.traplog)}
        script = self.info / f"{PKG}.{member}"
        return subprocess.run(["/bin/sh", "-c", f'"{script}" {" ".join(args)}'], env=env, cwd=self.work,
                              capture_output=True, text=True, timeout=30)

    def install(self, ipk: Path) -> list[str]:
        control = self.work / "control.tar.gz"
        control.write_bytes(member(ipk, "./control.tar.gz"))
        data = self.work / "data.tar.gz"
        data.write_bytes(member(ipk, "./data.tar.gz"))
        cdir = self.work / "control"
        cdir.mkdir()
        subprocess.run(["tar", "-xzf", str(control), "-C", str(cdir)], check=True, timeout=30)
        self.info.mkdir(parents=True)
        for m in sorted(cdir.iterdir()):
            (self.info / f"{PKG}.{m.name}").write_bytes(m.read_bytes())
            (self.info / f"{PKG}.{m.name}").chmod(m.stat().st_mode & 0o777)
        subprocess.run(["tar", "-xzf", str(data), "-C", str(self.root), "--numeric-owner",
                        "--no-same-permissions", "--delay-directory-restore"], check=True, timeout=30)
        listing = subprocess.run(["tar", "-tzf", str(data)], capture_output=True, text=True, check=True,
                                 timeout=30).stdout.split()
        files = ["/" + n[2:].rstrip("/") for n in listing if n not in ("./", ".")]
        (self.info / f"{PKG}.list").write_text("".join(f"{f}\n" for f in files))
        conffiles = (cdir / "conffiles").read_text().split()
        sums = " ".join(f"{c} {hashlib.md5((self.root / c.lstrip('/')).read_bytes()).hexdigest()}"
                        for c in conffiles)
        (self.root / "usr/lib/opkg/status").write_text(
            f"Package: {PKG}\nStatus: install user installed\nConffiles: {sums}\n")
        return files

    def remove(self) -> None:
        """After prerm: delete listed files (keeping a changed conffile), empty dirs, run postrm."""
        status = (self.root / "usr/lib/opkg/status").read_text()
        words = status.split("Conffiles: ", 1)[1].split()
        stored = dict(zip(words[::2], words[1::2], strict=True))
        listed = (self.info / f"{PKG}.list").read_text().split()
        for path in sorted(listed, reverse=True):  # children before their directories
            p = self.root / path.lstrip("/")
            if p.is_dir() and not p.is_symlink():
                if not any(p.iterdir()):
                    p.rmdir()
            elif path in stored and hashlib.md5(p.read_bytes()).hexdigest() != stored[path]:
                continue  # opkg: "not deleting modified conffile"
            elif p.exists():
                p.unlink()
        res = self.run_script("postrm", "remove")
        assert res.returncode == 0, res.stderr
        for f in self.info.glob(f"{PKG}.*"):
            f.unlink()
        (self.root / "usr/lib/opkg/status").unlink()
        for d in (self.info, self.info.parent, self.info.parent.parent, self.root / "usr"):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[StagedOpkg]:
    # world-traversable like a real / (pytest's tmp dirs are 0700): controld runs as nobody
    top = Path(tempfile.mkdtemp(prefix="igdpcp-root-"))
    top.chmod(0o755)
    root = top / "root"
    root.mkdir()
    try:
        yield StagedOpkg(root, tmp_path)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_install_run_remove(staged: StagedOpkg, make_testbed, tmp_path: Path) -> None:
    # --- build, then check the container with tools other than the builder
    ipk = build(tmp_path / "out")
    assert subprocess.run(["gzip", "-t", str(ipk)], timeout=30).returncode == 0
    outer = subprocess.run(["tar", "-tzf", str(ipk)], capture_output=True, text=True, timeout=30)
    assert outer.stdout.split() == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    for name in ("./data.tar.gz", "./control.tar.gz"):
        blob = member(ipk, name)
        (tmp_path / "inner.gz").write_bytes(blob)
        assert subprocess.run(["gzip", "-t", str(tmp_path / "inner.gz")], timeout=30).returncode == 0
        plain = gzip.decompress(blob)
        assert all(flag not in (b"x", b"g") for _n, flag, _m in raw_headers(plain)), name
        with tarfile.open(fileobj=io.BytesIO(plain)) as t:
            assert not t.pax_headers and all(not m.pax_headers for m in t.getmembers())

    # --- install as opkg does; postinst for an image root does nothing
    root = staged.root
    files = staged.install(ipk)
    assert "/usr/sbin/igdpcp-natd" in files and "/etc/config/igdpcp" in files
    before = snapshot(root)
    res = staged.run_script("postinst", "configure")  # no /lib/functions.sh: the wrapper bails out
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr
    assert snapshot(root) == before and staged.traplog.read_text() == ""
    # with base-files present, default_postinst runs our postinst-pkg: still nothing at all
    (root / "lib").mkdir()
    (root / "lib/functions.sh").write_text(FUNCTIONS_SH)
    before = snapshot(root)
    res = staged.run_script("postinst", "configure")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert staged.traplog.read_text() == f"default_postinst {staged.info}/{PKG}.postinst configure\n"
    assert snapshot(root) == before

    # --- the user edits the conffile (as 'uci set' would): this host has no user igdpcp,
    # so controld runs as nobody:nogroup, the group natd hands its ipc:// sockets to
    conf = root / "etc/config/igdpcp"
    edited = conf.read_text().replace("option ipc_group 'igdpcp'", "option ipc_group 'nogroup'")
    edited = edited.replace("#option log_level 'info'", "option log_level 'debug'")
    assert edited != conf.read_text()
    conf.write_text(edited)

    # --- run the installed daemons: project code only from the staged root
    venv_site = sysconfig.get_path("purelib")
    assert not [p for p in ("natd", "controld", "shared") if (Path(venv_site) / p).exists()]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": venv_site}
    probe = subprocess.run(
        [str(root / "usr/bin/igdpcp"), "--version"], env=env, capture_output=True, text=True, timeout=30)
    assert probe.stdout.startswith("igdpcp ") and ipk.name.split("_")[1] in probe.stdout
    where = subprocess.run(
        ["python3", "-B", "-P", "-c", "import natd.main, controld.main, shared.wire as w; "
         "print(natd.main.__file__, controld.main.__file__, w.__file__)"],
        env={**env, "PYTHONPATH": f"{root}/usr/lib/igdpcp:{venv_site}"}, cwd=ROOT,
        capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert all(f.startswith(f"{root}/usr/lib/igdpcp/") for f in where.stdout.split()), where.stdout

    bed = make_testbed()
    # controld unprivileged, as procd's 'user igdpcp' runs it: the bed's directory (sockets,
    # state) is reachable by its group only
    nogroup = 65534
    os.chown(bed.workdir, 0, nogroup)
    os.chmod(bed.workdir, 0o770)
    st = Stack(bed, layout="split", env=env, natd_args=["--layout", "standalone"])
    # natd with CAP_NET_ADMIN alone, as igdpcp-natd.service runs it (no CAP_NET_RAW: unused)
    st.argv = {"natd": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
                        "--bounding-set=-all,+net_admin",
                        str(root / "usr/sbin/igdpcp-natd"), "--config", str(conf)],
               "controld": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            "--inh-caps=-all", "--bounding-set=-all",
                            str(root / "usr/sbin/igdpcp-controld"), "--config", str(conf)]}
    try:
        st.start()
        ctl_pid = st.procs["controld"].pid
        status = Path(f"/proc/{ctl_pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", status, re.M), status
        assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M)
        natd_status = Path(f"/proc/{st.procs['natd'].pid}/status").read_text()
        assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", natd_status, re.M), natd_status
        assert re.search(r"^CapEff:\s+0*1000$", natd_status, re.M), natd_status  # bit 12: CAP_NET_ADMIN only
        for name in ("natd", "controld"):
            pid = st.procs[name].pid  # ip netns exec -> launcher -> exec python3: one pid
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[:6] == [b"python3", b"-u", b"-B", b"-P", b"-m", f"{name}.main".encode()], cmdline
            environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                           if b"=" in kv)
            assert environ[b"PYTHONPATH"] == f"{root}/usr/lib/igdpcp:{venv_site}".encode()

        add = st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8080", "TCP")
        assert f"external {tb.NAT2_PUBLIC_IP}:8080 TCP is redirected to internal {tb.LAN_HOST_IP}:8000" \
            in add.stdout, add.stdout + st.log("controld")[-2000:]
        listener = bed.tcp_listen("lan", 8000)
        time.sleep(0.2)
        sent = bed.tcp_send("inet", tb.NAT2_PUBLIC_IP, 8080, PAYLOAD, timeout=3)
        assert sent and listener.received(timeout=3) == PAYLOAD
        # the daemons read the installed, edited conffile: debug logging, sockets 0660
        for name in ("natd", "controld"):
            assert " DEBUG " in st.log(name), st.log(name)[-1500:]
        assert stat.S_IMODE(os.stat(st.rpc[len("ipc://"):]).st_mode) == 0o660

        # a config reload reaches natd as SIGHUP (procd reload_signal, systemd ExecReload):
        # whatever natd does with it, the forward stays and bytes still arrive
        os.kill(st.procs["natd"].pid, signal.SIGHUP)
        time.sleep(1.0)
        assert list(st.nat1_forwards().values()) == [(tb.LAN_HOST_IP, 8000)]
        listener = bed.tcp_listen("lan", 8000)
        time.sleep(0.2)
        sent = bed.tcp_send("inet", tb.NAT2_PUBLIC_IP, 8080, PAYLOAD, timeout=3)
        assert sent and listener.received(timeout=3) == PAYLOAD

        # the delete ends that flow through the conntrack worker the installed natd starts: as nobody
        # with CAP_NET_ADMIN inherited, without site-packages (-S), from the package directory alone
        st.upnpc("-d", "8080", "TCP")
        removed = re.compile(r"conntrack: removed [1-9][0-9]* entries")
        assert wait_until(lambda: removed.search(st.log("natd")), 5.0) is not None, st.log("natd")[-2000:]
    finally:
        st.close()

    # --- remove: prerm (image root: only default_prerm's bookkeeping), files, postrm
    res = staged.run_script("prerm", "remove")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert staged.traplog.read_text() == f"default_prerm {staged.info}/{PKG}.prerm remove\n"
    (root / "lib/functions.sh").unlink()
    (root / "lib").rmdir()
    staged.remove()
    assert staged.traplog.read_text() == ""  # postrm at image-build time: no nft, no uci
    left = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    assert left == {"etc", "etc/config", "etc/config/igdpcp"}, sorted(left)
    assert conf.read_text() == edited
