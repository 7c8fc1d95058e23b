"""The ipk and its contents, checked with tools that are not the builder: tar, gzip -t,
raw tar headers, the daemons' own argument parsers, dash, systemd-analyze.

Format facts: reference/openwrt.md §1.1-§1.5 (ipk container, GNU tar without PAX,
control fields, conffiles, default_postinst wrappers), §2 (procd), §3 (UCI), §4.5 (fw4).
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from shared.config import parse_args_with_config, parse_uci

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "packaging"
EPOCH = 1_700_000_000


def load_builder() -> ModuleType:
    """packaging/build-ipk as a module (it is a script: packaging/ is no Python package)."""
    loader = importlib.machinery.SourceFileLoader("igdpcp_build_ipk", str(PKG / "build-ipk"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = mod  # dataclasses look the module up by name
    loader.exec_module(mod)
    return mod


B = load_builder()


def build(out: Path, epoch: int = EPOCH, *extra: str) -> Path:
    """Run the documented build command as a user would; returns the ipk path."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
    res = subprocess.run([str(PKG / "build-ipk"), "--out", str(out), *extra], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    (ipk,) = out.glob("*.ipk")
    return ipk


@pytest.fixture(scope="module")
def ipk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ipk"))


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


# ---------------------------------------------------------------- the container

def test_name_and_outer_layout(ipk: Path) -> None:
    """Gzip'd tar (not ar), members in ipkg-build's order with './' (§1.1)."""
    assert re.fullmatch(r"igdpcp_\d+\.\d+\.\d+-\d+_all\.ipk", ipk.name)
    assert ipk.read_bytes()[:2] == b"\x1f\x8b"
    listing = subprocess.run(["tar", "-tzf", str(ipk)], capture_output=True, text=True, timeout=30)
    assert listing.stdout.split() == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert member(ipk, "./debian-binary") == b"2.0\n"


def test_gzip_integrity(ipk: Path, tmp_path: Path) -> None:
    for name in ("./data.tar.gz", "./control.tar.gz"):
        (tmp_path / "m.gz").write_bytes(member(ipk, name))
        assert subprocess.run(["gzip", "-t", str(tmp_path / "m.gz")], timeout=30).returncode == 0
    assert subprocess.run(["gzip", "-t", str(ipk)], timeout=30).returncode == 0
    # gzip -n: no name, no time in any header (reproducibility, §1.2)
    for blob in (ipk.read_bytes(), member(ipk, "./data.tar.gz"), member(ipk, "./control.tar.gz")):
        assert blob[3] & 0x08 == 0 and blob[4:8] == b"\0\0\0\0"


def test_gnu_format_without_pax_headers(ipk: Path) -> None:
    """opkg-lede's tar reader has no PAX support: typeflag x/g would be 'Unknown' (§1.2)."""
    tars = {"outer": gzip.decompress(ipk.read_bytes()),
            "data": gzip.decompress(member(ipk, "./data.tar.gz")),
            "control": gzip.decompress(member(ipk, "./control.tar.gz"))}
    for which, blob in tars.items():
        heads = raw_headers(blob)
        assert heads, which
        for name, flag, magic in heads:
            assert magic == b"ustar  \0", (which, name, magic)  # GNU, not POSIX ustar/PAX
            assert flag in (b"0", b"5", b"L"), (which, name, flag)
        with tarfile.open(fileobj=io.BytesIO(blob)) as t:
            assert not t.pax_headers
            assert all(not m.pax_headers for m in t.getmembers()), which


def test_owners_modes_and_mtime(ipk: Path) -> None:
    scripts = {"." + target for target, src in B.contributed(PKG / "fw4") + B.contributed(PKG / "hooks")
               if src.read_bytes().startswith(b"#!")}
    for name in ("./data.tar.gz", "./control.tar.gz"):
        for m in tar_list(gzip.decompress(member(ipk, name))):
            assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root"), m.name
            assert m.mtime == EPOCH, m.name
            assert m.name == "." or m.name.startswith("./"), m.name  # tarfile reads './' as '.'
            executable = (m.isdir() or name == "./control.tar.gz" and m.name not in ("./control", "./conffiles")
                          or re.match(r"\./(usr/s?bin/|etc/init\.d/|etc/hotplug\.d/iface/)", m.name)
                          or m.name in scripts)
            assert m.mode == (0o755 if executable else 0o644), (m.name, oct(m.mode))


def test_reproducible_and_source_date_epoch(tmp_path: Path) -> None:
    # built back to back (not against the module's ipk): others may edit sources meanwhile
    first, again = build(tmp_path / "a"), build(tmp_path / "b")
    assert again.read_bytes() == first.read_bytes()
    later = build(tmp_path / "c", EPOCH + 86400)
    assert later.read_bytes() != first.read_bytes()
    assert {m.mtime for m in tar_list(gzip.decompress(later.read_bytes()))} == {EPOCH + 86400}


# ---------------------------------------------------------------- control

def control_fields(ipk: Path) -> dict[str, str]:
    ctl = tarfile.open(fileobj=io.BytesIO(member(ipk, "./control.tar.gz")))
    text = ctl.extractfile("./control").read().decode()
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith(" "):
            fields[key] += "\n" + line
        else:
            key, _, value = line.partition(": ")
            fields[key] = value
    return fields


def test_control_fields(ipk: Path) -> None:
    f = control_fields(ipk)
    for key in ("Package", "Version", "Depends", "Architecture", "Installed-Size", "Description",
                "License", "Maintainer", "Section", "Source"):
        assert f.get(key), key
    assert list(f)[:3] == ["Package", "Version", "Depends"] and list(f)[-1] == "Description"
    assert f["Package"] == "igdpcp" and re.fullmatch(r"[a-z0-9.+-]+", f["Package"])
    assert f["Architecture"] == "all"
    assert f["Version"] == ipk.name.split("_")[1]
    # ipkg-build's rule: Installed-Size is the byte count of the uncompressed data.tar
    assert int(f["Installed-Size"]) == len(gzip.decompress(member(ipk, "./data.tar.gz")))
    assert f["Require-User"] == "igdpcp:igdpcp"
    deps = f["Depends"].split(", ")
    for piece in ("python3-light", "python3-msgpack", "python3-pyzmq",
                  "python3-nftables", "nftables-json", "libzmq", "firewall4"):
        assert piece in deps, piece
    assert "python3" not in deps  # the meta-package pulls in everything (§5)


def test_depends_cover_what_the_daemons_import(ipk: Path) -> None:
    """Import both daemons for real and map every split-out or third-party module the
    project's own files import to the package in Depends (reference/openwrt.md §5)."""
    code = ("import sys, natd.main, controld.main\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=ROOT, timeout=60, check=True).stdout.split())
    own = " ".join(p.read_text() for pkg in ("natd", "controld", "shared") for p in (ROOT / pkg).rglob("*.py")
                   if p.name not in ("testbed.py", "stack.py", "cli.py"))  # test-bed tools, not daemons
    direct = {m for m in loaded if re.search(rf"^\s*(?:import|from) {m}\b", own, re.M)}
    deps = set(control_fields(ipk)["Depends"].split(", "))
    for mod in direct - {"natd", "controld", "shared", "__future__"}:
        if mod in B.MODULE_PACKAGES:
            assert B.MODULE_PACKAGES[mod] in deps, mod
        else:
            assert mod in sys.stdlib_module_names, f"{mod}: third-party import without an OpenWrt package"


def test_conffiles_and_maintainer_scripts(ipk: Path) -> None:
    ctl = tarfile.open(fileobj=io.BytesIO(member(ipk, "./control.tar.gz")))
    assert ctl.extractfile("./conffiles").read() == b"/etc/config/igdpcp\n"
    data = [m.name for m in tar_list(gzip.decompress(member(ipk, "./data.tar.gz")))]
    assert "./etc/config/igdpcp" in data
    post = ctl.extractfile("./postinst").read().decode()
    prerm = ctl.extractfile("./prerm").read().decode()
    # package-pack.mk's wrappers: bail out without functions.sh, else default_postinst/prerm
    assert '[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0' in post
    assert 'default_postinst "$0" "$@"' in post and 'default_prerm "$0" "$@"' in prerm
    assert '"${IPKG_NO_SCRIPT}" = "1" ] && exit 0' in post
    # postinst-pkg is *sourced* by default_postinst: an 'exit' there would end it early
    body = ctl.extractfile("./postinst-pkg").read().decode()
    assert not re.search(r"^\s*exit\b", body, re.M)


def test_data_layout(ipk: Path) -> None:
    names = {m.name for m in tar_list(gzip.decompress(member(ipk, "./data.tar.gz")))}
    for path in ("./usr/sbin/igdpcp-natd", "./usr/sbin/igdpcp-controld", "./usr/bin/igdpcp",
                 "./etc/init.d/igdpcp-natd", "./etc/init.d/igdpcp-controld",
                 "./etc/hotplug.d/iface/60-igdpcp", "./usr/lib/igdpcp/natd/main.py",
                 "./usr/lib/igdpcp/controld/main.py", "./usr/lib/igdpcp/shared/wire.py"):
        assert path in names, path
    # version-neutral: no python3.X directory, no bytecode (§1.6)
    assert not [n for n in names if re.search(r"python3\.\d+|\.pyc$|__pycache__", n)]


def test_fw4_and_hook_files_ship_at_the_path_they_name(tmp_path: Path) -> None:
    fw4, hooks = tmp_path / "fw4", tmp_path / "hooks"
    (fw4 / "chain-post").mkdir(parents=True)
    hooks.mkdir()
    (fw4 / "table-post.nft").write_text("# /usr/share/nftables.d/table-post/30-igdpcp.nft\nchain x {}\n")
    (fw4 / "chain-post" / "j.nft").write_text(
        "# install: /usr/share/nftables.d/chain-post/dstnat/30-igdpcp.nft\njump x\n")
    (hooks / "udhcpc").write_text("#!/bin/sh\n# /etc/udhcpc.user.d/igdpcp-pcp\ntrue\n")
    ipk = build(tmp_path / "out", EPOCH, "--fw4-dir", str(fw4), "--hooks-dir", str(hooks))
    got = {m.name: m for m in tar_list(gzip.decompress(member(ipk, "./data.tar.gz")))}
    assert got["./usr/share/nftables.d/table-post/30-igdpcp.nft"].mode == 0o644
    assert got["./usr/share/nftables.d/chain-post/dstnat/30-igdpcp.nft"].mode == 0o644
    assert got["./etc/udhcpc.user.d/igdpcp-pcp"].mode == 0o755
    # a file that names no path is refused, naming the file
    (hooks / "bad").write_text("no comment here\n")
    res = subprocess.run([str(PKG / "build-ipk"), "--out", str(tmp_path / "x"), "--hooks-dir", str(hooks)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and f"{hooks / 'bad'}: first comment line must name" in res.stderr


def test_the_projects_fw4_and_hook_files_are_in_the_ipk(ipk: Path) -> None:
    names = {m.name for m in tar_list(gzip.decompress(member(ipk, "./data.tar.gz")))}
    for target, _src in B.contributed(PKG / "fw4") + B.contributed(PKG / "hooks"):
        assert "." + target in names, target


def test_packaging_is_not_an_importable_package() -> None:
    """packaging/ must not shadow the 'packaging' library pip and setuptools import."""
    assert not list(PKG.rglob("__init__.py"))
    res = subprocess.run([sys.executable, "-c", "import packaging, sys; print(packaging.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "site-packages" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------- UCI sample

def sample_config(flavour: str) -> str:
    return B._template("files/igdpcp.config", "0-test", flavour).decode()


def uncommented(text: str) -> str:
    return re.sub(r"^(\s*)#((?:option|list) )", r"\1\2", text, flags=re.M)


@pytest.mark.parametrize("flavour", ["openwrt", "debian"])
def test_uci_sample_documents_every_flag(flavour: str, tmp_path: Path) -> None:
    """Every daemon flag appears (set or as a commented default) in its section, and the
    file parses with every commented example switched on (rfc6970-iwf config, §3.1)."""
    from controld.main import build_parser as controld_parser
    from natd.main import build_parser as natd_parser

    text = sample_config(flavour)
    sections = {s.type: s for s in parse_uci(uncommented(text), "sample")}
    for stype, parser in (("natd", natd_parser), ("controld", controld_parser)):
        flags = {s[2:].replace("-", "_") for a in parser()._actions for s in a.option_strings
                 if s.startswith("--") and not s.startswith("--no-")} - {"help", "config"}
        documented = set(sections[stype].options) | set(sections[stype].lists)
        assert not flags - documented, f"document in packaging/files/igdpcp.config [{stype}]: {flags - documented}"
        assert not documented - flags, f"packaging/files/igdpcp.config [{stype}] names no flag: {documented - flags}"
        path = tmp_path / f"{stype}.conf"
        path.write_text(uncommented(text))
        ns = parse_args_with_config(parser(), ["--config", str(path)], stype)
        assert ns.rpc.startswith("ipc://")
    assert "@" not in text


# ---------------------------------------------------------------- shell scripts

def shell_scripts() -> list[Path]:
    return [*(PKG / "files").glob("*.init"), *(PKG / "files").glob("*.hotplug"),
            *(PKG / "files").glob("*.launcher"), *(PKG / "control").iterdir()]


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.name)
def test_shell_syntax(script: Path) -> None:
    res = subprocess.run(["dash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_launcher_version(tmp_path: Path) -> None:
    B.stage(tmp_path, "openwrt")
    res = subprocess.run([str(tmp_path / "usr/sbin/igdpcp-natd"), "--version"], capture_output=True,
                         text=True, timeout=30)
    assert res.stdout.strip() == f"igdpcp-natd {B.project_version()}-{B.RELEASE}"


PROCD_SHIM = r"""
# Records what an init script asks procd for, one line per call (a test harness, not procd).
procd_open_instance() { echo "open $*"; }
procd_close_instance() { echo "close"; }
procd_set_param() { echo "set $*"; }
procd_append_param() { echo "append $*"; }
procd_add_reload_trigger() { echo "reload_trigger $*"; }
procd_add_reload_interface_trigger() { echo "interface_trigger $*"; }
logger() { echo "logger $*"; }
mkdir() { echo "mkdir $*"; }
chown() { echo "chown $*"; }
chgrp() { echo "chgrp $*"; }
chmod() { echo "chmod $*"; }
config_load() { :; }
config_get() {  # var section option [default], from the real file through shared.config
	local v
	v=$(PYTHONPATH="$REPO" python3 -c 'import sys
from shared.config import load_uci
s = {x.name: x for x in load_uci(sys.argv[1])}.get(sys.argv[2])
print(s.options.get(sys.argv[3], "") if s else "")' "$UCI_FILE" "$2" "$3") || exit 1
	eval "$1=\${v:-\$4}"
}
config_get_bool() { config_get "$@"; eval "case \$$1 in 1|yes|on|true|enabled) $1=1;; *) $1=0;; esac"; }
network_find_wan() { eval "$1=wan"; }
network_get_device() { case "$2" in wan) eval "$1=eth1";; lan) eval "$1=br-lan";; *) eval "$1=";; esac; }
"""


def run_init(tmp_path: Path, name: str, config: str) -> list[str]:
    """Source an init script with a recording procd shim; returns the calls made."""
    (tmp_path / "shim.sh").write_text(PROCD_SHIM)
    (tmp_path / "igdpcp").write_text(config)
    script = B._template(f"files/{name}.init", "0-test").decode()
    script = script.replace("/lib/functions/network.sh", str(tmp_path / "shim.sh"))
    script = script.replace("/var/run/igdpcp-natd.wan", str(tmp_path / "wan"))
    (tmp_path / name).write_text(script)
    res = subprocess.run(["dash", "-c", f'. "{tmp_path}/shim.sh"; . "{tmp_path}/{name}"; '
                                        'start_service; service_triggers'],
                         env={"PATH": "/usr/bin:/bin", "REPO": str(ROOT), "UCI_FILE": str(tmp_path / "igdpcp")},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def init_command(calls: list[str]) -> list[str]:
    (cmd,) = [c.split()[2:] for c in calls if c.startswith("set command ")]
    return cmd


def test_procd_natd_instance(tmp_path: Path) -> None:
    calls = run_init(tmp_path, "igdpcp-natd", sample_config("openwrt"))
    cmd = init_command(calls)
    assert cmd[:3] == ["/usr/sbin/igdpcp-natd", "--config", "/etc/config/igdpcp"]
    # the command procd would run parses with natd's own parser and the shipped config
    from natd.main import build_parser
    ns = parse_args_with_config(build_parser(), ["--config", str(tmp_path / "igdpcp"), *cmd[3:]], "natd")
    assert (ns.wan_if, ns.lan_if, ns.ipc_group) == ("eth1", "br-lan", "igdpcp")
    assert "set reload_signal HUP" in calls and "set file /etc/config/igdpcp /etc/config/firewall" in calls
    assert "set respawn 3600 5 5" in calls
    assert "reload_trigger igdpcp firewall" in calls
    assert (tmp_path / "wan").read_text() == "eth1\n"
    assert not [c for c in calls if c.startswith("set user")]  # natd stays root


def test_procd_controld_instance(tmp_path: Path) -> None:
    calls = run_init(tmp_path, "igdpcp-controld", sample_config("openwrt"))
    cmd = init_command(calls)
    from controld.main import build_parser
    ns = parse_args_with_config(build_parser(), ["--config", str(tmp_path / "igdpcp"), *cmd[3:]], "controld")
    assert (ns.lan_if, ns.state_dir) == ("br-lan", "/var/lib/igdpcp")
    assert "set user igdpcp" in calls and "set group igdpcp" in calls
    assert "chown igdpcp:igdpcp /var/lib/igdpcp" in calls
    assert "set reload_signal HUP" in calls and "reload_trigger igdpcp" in calls
    assert "interface_trigger lan" in calls


def test_procd_disabled_starts_nothing(tmp_path: Path) -> None:
    off = sample_config("openwrt").replace("option enabled '1'", "option enabled '0'")
    for name in ("igdpcp-natd", "igdpcp-controld"):
        assert not [c for c in run_init(tmp_path, name, off) if c.startswith("open")]


def test_start_stop_order() -> None:
    """natd starts before controld and stops after it (rc.d S/K links, §2.1)."""
    def num(name: str, key: str) -> int:
        return int(re.search(rf"^{key}=(\d+)$", (PKG / "files" / f"{name}.init").read_text(), re.M)[1])
    assert num("igdpcp-natd", "START") < num("igdpcp-controld", "START")
    assert num("igdpcp-natd", "STOP") > num("igdpcp-controld", "STOP")


# ---------------------------------------------------------------- systemd

def unit(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Debian install tree plus what systemd-analyze needs from the host (targets, kill)."""
    root = tmp_path_factory.mktemp("debroot")
    B.stage(root, "debian")
    for target in Path("/lib/systemd/system").glob("*.target"):
        if not (root / "lib/systemd/system" / target.name).exists():
            shutil.copy(target, root / "lib/systemd/system" / target.name)
    (root / "bin").mkdir(exist_ok=True)
    if os.path.exists("/bin/kill"):  # ExecReload's command must exist for verify
        shutil.copy("/bin/kill", root / "bin/kill")
    return root


UNITS = ["igdpcp-natd.service", "igdpcp-controld.service", "igdpcp-controld@lanns.service"]


def analyze(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                           *(f"lib/systemd/system/{u}" for u in units)],
                          cwd=root, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify_clean(debian_root: Path) -> None:
    res = analyze(debian_root, *UNITS)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr
    # and it does complain about a broken unit (the check can fail)
    bad = debian_root / "lib/systemd/system/broken.service"
    bad.write_text("[Service]\nExecStart=/usr/sbin/igdpcp-missing\nProtectSystem=bogus\n")
    try:
        res = analyze(debian_root, "broken.service")
        assert res.returncode != 0 or res.stderr
    finally:
        bad.unlink()


def test_systemd_units_privileges(debian_root: Path) -> None:
    sysd = debian_root / "lib/systemd/system"
    natd = unit((sysd / "igdpcp-natd.service").read_text())
    ctl = unit((sysd / "igdpcp-controld.service").read_text())
    assert natd["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert natd["AmbientCapabilities"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert natd["User"] != ["root"] and natd["Group"] == ["igdpcp"]
    assert ctl["User"] == ["igdpcp"] and ctl["CapabilityBoundingSet"] == [""]
    assert ctl["AmbientCapabilities"] == [""] and ctl["ProtectSystem"] == ["strict"]
    assert ctl["StateDirectory"] == ["igdpcp"] and "${STATE_DIRECTORY}" in ctl["ExecStart"][0]
    assert "igdpcp-natd.service" in ctl["After"][0]  # natd first, stopped last
    for u in (natd, ctl):
        assert u["ExecStart"][0].split()[1:3] == ["--config", "/etc/igdpcp/igdpcp"]
        assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    netns = unit((sysd / "igdpcp-controld@.service").read_text())
    assert netns["NetworkNamespacePath"] == ["/run/netns/%i"]
    # the netns unit is the plain unit plus the namespace: one definition of the rest
    same = {k: v for k, v in netns.items() if k not in ("NetworkNamespacePath", "Description", "Conflicts")}
    assert same == {k: v for k, v in ctl.items() if k != "Description"}
    sysusers = (debian_root / "usr/lib/sysusers.d/igdpcp.conf").read_text()
    assert re.search(r"^u igdpcp ", sysusers, re.M) and re.search(r"^m igdpcp-natd igdpcp$", sysusers, re.M)


def test_debian_config_runs_natd_and_controld_without_flags(debian_root: Path) -> None:
    """On systemd hosts only --config is passed: the file must satisfy every required flag."""
    from controld.main import build_parser as controld_parser
    from natd.main import build_parser as natd_parser

    conf = str(debian_root / "etc/igdpcp/igdpcp")
    ns = parse_args_with_config(natd_parser(), ["--config", conf], "natd")
    assert ns.rpc == "ipc:///run/igdpcp/rpc.sock" and ns.wan_if
    ns = parse_args_with_config(controld_parser(), ["--config", conf, "--state-dir", "/x"], "controld")
    assert ns.events == "ipc:///run/igdpcp/events.sock"


# ---------------------------------------------------------------- OpenWrt feed Makefile

def test_openwrt_feed_makefile_matches_the_ipk(ipk: Path) -> None:
    mk = (PKG / "openwrt" / "Makefile").read_text()
    assert re.search(r"^PKGARCH:=all$", mk, re.M)
    version, release = ipk.name.split("_")[1].split("-")
    assert re.search(rf"^PKG_VERSION:={re.escape(version)}$", mk, re.M)
    assert re.search(rf"^PKG_RELEASE:={release}$", mk, re.M)
    deps = control_fields(ipk)["Depends"].split(", ")
    depends_line = re.search(r"^\s*DEPENDS:=(.*)$", mk, re.M)[1].split()
    assert sorted(d.lstrip("+") for d in depends_line) == sorted(deps), \
        "run: packaging/build-ipk --update-feed-makefile"
    assert "/etc/config/igdpcp" in re.search(r"define Package/igdpcp/conffiles\n(.*?)endef", mk, re.S)[1]
    # the SDK package carries the same maintainer scripts ($ escaped for make)
    for define, name in (("postinst", "postinst-pkg"), ("prerm", "prerm-pkg"), ("postrm", "postrm")):
        body = re.search(rf"define Package/igdpcp/{define}\n(.*?)endef", mk, re.S)[1]
        assert body.replace("$$", "$") == (PKG / "control" / name).read_text(), define


def test_stage_openwrt_equals_ipk_data(tmp_path: Path) -> None:
    """The feed Makefile installs build-ipk --stage: the same files, modes and bytes."""
    ipk = build(tmp_path / "ipk")
    root = tmp_path / "root"
    B.stage(root, "openwrt")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member(ipk, "./data.tar.gz")))) as t:
        want = {m.name[1:]: (m.mode, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()}
    got = {"/" + p.relative_to(root).as_posix(): (p.stat().st_mode & 0o7777, p.read_bytes())
           for p in root.rglob("*") if p.is_file()}
    assert got == want


@pytest.mark.parametrize("event, expect", [
    ({"ACTION": "ifup", "INTERFACE": "wan", "DEVICE": "eth1"}, "ubus call service signal"),
    ({"ACTION": "ifupdate", "INTERFACE": "wan", "DEVICE": "eth1"}, "ubus call service signal"),
    ({"ACTION": "ifup", "INTERFACE": "wan", "DEVICE": "pppoe-wan"}, "init restart"),
    ({"ACTION": "ifdown", "INTERFACE": "wan", "DEVICE": "eth1"}, ""),
    ({"ACTION": "ifup", "INTERFACE": "lan", "DEVICE": "br-lan"}, ""),
])
def test_hotplug_iface_script(tmp_path: Path, event: dict[str, str], expect: str) -> None:
    """WAN ifup/ifupdate after fw4's reload: SIGHUP to natd (re-sync); a new WAN device:
    restart with the new --wan-if; anything else: nothing (reference/openwrt.md §4.5, §6)."""
    (tmp_path / "shim.sh").write_text(PROCD_SHIM)
    (tmp_path / "igdpcp").write_text(sample_config("openwrt"))
    (tmp_path / "wan").write_text("eth1\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "ubus").write_text('#!/bin/sh\necho "ubus $*"\n')
    (bin_ / "init").write_text('#!/bin/sh\n[ "$1" = enabled ] && exit 0\necho "init $*"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = B._template("files/igdpcp.hotplug", "0-test").decode()
    for real, fake in (("/lib/functions/network.sh", tmp_path / "shim.sh"), ("/lib/functions.sh", tmp_path / "shim.sh"),
                       ("/var/run/igdpcp-natd.wan", tmp_path / "wan"), ("/etc/init.d/igdpcp-natd", bin_ / "init")):
        script = script.replace(real, str(fake))
    res = subprocess.run(["dash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{bin_}:/usr/bin:/bin", "REPO": str(ROOT),
                              "UCI_FILE": str(tmp_path / "igdpcp"), **event})
    assert res.returncode == 0, res.stderr
    calls = [c for c in res.stdout.splitlines() if not c.startswith("logger ")]
    if expect.startswith("ubus"):
        expect = 'ubus call service signal {"name":"igdpcp-natd","instance":"natd","signal":1}'
    assert calls == ([expect] if expect else []), calls


def test_postrm_removes_fw4_layout_objects(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """In the fw4 layout natd's objects live inside `inet fw4`; removing the package must not
    leave its forwards active until some later fw4 reload (openwrt.md §4)."""
    import subprocess

    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("nft", 'echo "nft $*" >> "$CALLS"; case "$*" in "list table inet fw4") '
                               'echo "chain igdpcp_dstnat {";; esac; exit 0'),
                       ("fw4", 'echo "fw4 $*" >> "$CALLS"'), ("uci", "exit 1")):
        f = bin_dir / name
        f.write_text(f"#!/bin/sh\n{body}\n")
        f.chmod(0o755)
    script = os.path.join(os.path.dirname(__file__), "..", "packaging", "control", "postrm")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls)}
    subprocess.run(["sh", script], env=env, check=True)
    assert "fw4 -q reload" in calls.read_text()
    calls.unlink()
    subprocess.run(["sh", script], env={**env, "IPKG_INSTROOT": "/tmp/rootfs"}, check=True)
    assert not calls.exists()  # nothing at image-build time
