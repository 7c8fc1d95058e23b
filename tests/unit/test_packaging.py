"""The ipk and its contents, checked with tools that are not the builder: tar, gzip -t,
raw tar headers, the daemons' own argument parsers, dash, systemd-analyze.

Format facts from OpenWrt's scripts/ipkg-build and include/package-pack.mk (ipk container, GNU tar without PAX,
control fields, conffiles, default_postinst wrappers), §2 (procd), §3 (UCI), §4.5 (fw4).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from shared.config import parse_args_with_config, parse_uci
from tests.bed.ipk import EPOCH, PKG, ROOT, build, extract, group, load_builder, member, raw_headers, tar_list

B = load_builder()


@pytest.fixture(scope="module")
def ipk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("ipk"))


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
    text = extract(ctl, "./control").decode()
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
    # one IGD per LAN: miniupnpd (every variant) cannot be installed beside it
    assert f["Conflicts"] == "miniupnpd, miniupnpd-iptables, miniupnpd-nftables"
    assert f["Provides"] == "miniupnpd"


def test_depends_cover_what_the_daemons_import(ipk: Path) -> None:
    """Import both daemons for real and map every split-out or third-party module the
    project's own files import to the package in Depends (the packages feed's lang/python)."""
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
    assert extract(ctl, "./conffiles") == b"/etc/config/igdpcp\n"
    data = [m.name for m in tar_list(gzip.decompress(member(ipk, "./data.tar.gz")))]
    assert "./etc/config/igdpcp" in data
    post = extract(ctl, "./postinst").decode()
    prerm = extract(ctl, "./prerm").decode()
    # package-pack.mk's wrappers: bail out without functions.sh, else default_postinst/prerm
    assert '[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0' in post
    assert 'default_postinst "$0" "$@"' in post and 'default_prerm "$0" "$@"' in prerm
    assert '"${IPKG_NO_SCRIPT}" = "1" ] && exit 0' in post
    # postinst-pkg is *sourced* by default_postinst: an 'exit' there would end it early
    body = extract(ctl, "./postinst-pkg").decode()
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


def test_data_ships_only_runtime_code(ipk: Path) -> None:
    """No test bed, demo, fake or fixture reaches the router; no shipped module imports one."""
    data = tarfile.open(fileobj=io.BytesIO(gzip.decompress(member(ipk, "./data.tar.gz"))))
    names = data.getnames()
    assert "./usr/lib/igdpcp/shared/const.py" in names  # the listing is the real one
    bed = [n for n in names if re.search(r"testbed|stack\.py|demo|fake_pcp|fuzz|fixtures|/tests?/|conftest", n)]
    assert not bed, bed
    for m in data.getmembers():
        if m.name.endswith(".py"):
            text = data.extractfile(m).read().decode()  # type: ignore[union-attr]
            # module level: controld/cli.py guards its old demo import until it becomes admin-only
            assert not re.search(r"^(from|import) tests\b", text, re.M), m.name


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
    file parses with every commented example switched on (UCI's file conventions)."""
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
            *(PKG / "files").glob("*.launcher"), *(PKG / "control").iterdir(),
            PKG / "debian" / "dhclient-exit-hook", PKG / "debian" / "dnsmasq-dhcp-script"]


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
uci() { echo "uci $*"; }
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


def enabled_config() -> str:
    """The shipped OpenWrt config, switched on as a user does (it ships disabled)."""
    text = sample_config("openwrt")
    assert "option enabled '0'" in text
    return text.replace("option enabled '0'", "option enabled '1'")


def test_procd_natd_instance(tmp_path: Path) -> None:
    calls = run_init(tmp_path, "igdpcp-natd", enabled_config())
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
    calls = run_init(tmp_path, "igdpcp-controld", enabled_config())
    cmd = init_command(calls)
    from controld.main import build_parser
    ns = parse_args_with_config(build_parser(), ["--config", str(tmp_path / "igdpcp"), *cmd[3:]], "controld")
    assert (ns.lan_if, ns.state_dir) == ("br-lan", "/var/lib/igdpcp")
    assert "set user igdpcp" in calls and "set group igdpcp" in calls
    assert "chown igdpcp:igdpcp /var/lib/igdpcp" in calls
    assert "set reload_signal HUP" in calls and "reload_trigger igdpcp" in calls
    assert "interface_trigger lan" in calls
    # no UUID in the shipped config: one is made, written to UCI and passed on (as miniupnpd's init)
    (made,) = [c.split("=", 1)[1] for c in calls if c.startswith("uci -q set igdpcp.controld.uuid=")]
    assert "uci -q commit igdpcp" in calls and ns.uuid == str(uuid.UUID(made))
    fixed = "b7e7a701-bc34-4686-8a87-dfaeb7e7a701"
    kept = run_init(tmp_path, "igdpcp-controld", enabled_config().replace(
        "config controld 'controld'", f"config controld 'controld'\n\toption uuid '{fixed}'"))
    assert not [c for c in kept if c.startswith("uci")]
    assert init_command(kept)[-2:] == ["--uuid", fixed]


def test_procd_shipped_disabled_starts_nothing(tmp_path: Path) -> None:
    """As miniupnpd's package: installed means off until service.enabled is 1; no 'enabled'
    option at all is off too (the init scripts' default)."""
    shipped = sample_config("openwrt")
    missing = shipped.replace("option enabled '0'", "")
    for text in (shipped, missing):
        for name in ("igdpcp-natd", "igdpcp-controld"):
            calls = run_init(tmp_path, name, text)
            assert not [c for c in calls if c.startswith("open")], calls
            assert "logger -t igdpcp not started: set igdpcp.service.enabled=1" in calls


def test_default_acl_allows_1024_up_to_lan_hosts_and_denies_the_rest(tmp_path: Path) -> None:
    """miniupnpd's shipped perm_rule sections, with its option names, reach controld's
    --permission (after any 'list permission') and are active in the shipped config."""
    from controld.core.policy import Permissions
    from controld.main import build_parser

    for flavour in ("openwrt", "debian"):
        rules = [x for x in parse_uci(sample_config(flavour), "sample") if x.type == "perm_rule"]
        assert [r.options["action"] for r in rules] == ["allow", "deny"]
        (tmp_path / "igdpcp").write_text(sample_config(flavour))
        ns = parse_args_with_config(build_parser(), ["--config", str(tmp_path / "igdpcp"), "--lan-if", "x",
                                                     "--state-dir", "/tmp"], "controld")
        assert ns.permission == ["allow 1024-65535 0.0.0.0/0 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535"]
        perms = Permissions.parse(ns.permission)
        assert perms.allowed(1024, "192.168.1.20", 1024) and perms.allowed(65535, "192.168.1.20", 8080)
        assert not perms.allowed(1023, "192.168.1.20", 8080) and not perms.allowed(8080, "192.168.1.20", 80)
        assert not perms.allowed(22, "192.168.1.20", 22)


def test_start_stop_order() -> None:
    """natd starts before controld and stops after it (rc.d S/K links, §2.1)."""
    def num(name: str, key: str) -> int:
        return int(group(rf"^{key}=(\d+)$", (PKG / "files" / f"{name}.init").read_text(), re.M))
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


def test_debian_install_step_compiles_bytecode_the_launchers_read(debian_root: Path) -> None:
    """The launchers run python3 -B (never write bytecode): the Debian staging step compiles every
    module for the python3 that runs it (checked-hash), and the installed tree imports from it."""
    lib = debian_root / "usr/lib/igdpcp"
    tag = sys.implementation.cache_tag
    modules = sorted(lib.rglob("*.py"))
    assert modules and [p for p in modules if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()] == []
    probe = subprocess.run([sys.executable, "-B", "-P", "-c", "import controld.main as m; print(m.__cached__)"],
                           env={"PYTHONPATH": f"{lib}:{os.pathsep.join(sys.path[1:])}"},
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and Path(probe.stdout.strip()).exists(), probe.stderr


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
    # CAP_NET_ADMIN only: nftables, rtnetlink, ctnetlink, the nftables monitor; no raw IP socket
    # anywhere (tests/netns/test_install.py runs natd with exactly this)
    assert natd["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert natd["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
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


def set_devices(text: str) -> str:
    """The Debian config with the devices set, as the admin does after install."""
    for opt in ("wan_if 'eth1'", "lan_if 'br-lan'"):
        text = text.replace(f"#option {opt}", f"option {opt}")
    return text


def test_debian_config_has_no_active_device_and_runs_once_they_are_set(debian_root: Path, tmp_path: Path) -> None:
    """No placeholder interfaces: shipped, natd refuses for want of --wan-if; with the devices
    set, only --config is needed (the units pass nothing else)."""
    from controld.main import build_parser as controld_parser
    from natd.main import build_parser as natd_parser

    shipped = (debian_root / "etc/igdpcp/igdpcp").read_text()
    assert not re.search(r"^\s*option (wan_if|lan_if) ", shipped, re.M)
    with pytest.raises(SystemExit):
        parse_args_with_config(natd_parser(), ["--config", str(debian_root / "etc/igdpcp/igdpcp")], "natd")
    conf = tmp_path / "igdpcp"
    conf.write_text(set_devices(shipped))
    ns = parse_args_with_config(natd_parser(), ["--config", str(conf)], "natd")
    assert ns.rpc == "ipc:///run/igdpcp/rpc.sock" and (ns.wan_if, ns.lan_if) == ("eth1", "br-lan")
    ns = parse_args_with_config(controld_parser(), ["--config", str(conf), "--state-dir", "/x"], "controld")
    assert ns.events == "ipc:///run/igdpcp/events.sock" and ns.lan_if == "br-lan"


def test_systemd_units_skip_start_with_a_message_until_devices_are_set(debian_root: Path, tmp_path: Path) -> None:
    """Each unit's ExecCondition (need-config) runs as systemd would: exit 1 (start skipped, no
    restart loop) naming what to set; exit 0 once it is set; a broken file is named too."""
    sysd = debian_root / "lib/systemd/system"
    env = {"PATH": "/usr/bin:/bin"}
    conf = debian_root / "etc/igdpcp/igdpcp"
    for name, needs in (("igdpcp-natd.service", "wan_if lan_if"), ("igdpcp-controld.service", "lan_if"),
                        ("igdpcp-controld@.service", "lan_if")):
        (cond,) = unit((sysd / name).read_text())["ExecCondition"]
        argv = cond.split()
        assert argv[0] == f"{B.LIBDIR}/need-config" and argv[1] == "/etc/igdpcp/igdpcp"
        tool = [str(debian_root / argv[0].lstrip("/"))]
        res = subprocess.run([*tool, str(conf), *argv[2:]], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, res
        assert f"set option {needs} in section '{argv[2]}' of {conf}" in res.stderr, res.stderr
        good = tmp_path / "good"
        good.write_text(set_devices(conf.read_text()))
        res = subprocess.run([*tool, str(good), *argv[2:]], env=env, capture_output=True, text=True, timeout=60)
        assert (res.returncode, res.stderr) == (0, ""), res.stderr
    bad = tmp_path / "bad"
    bad.write_text("config natd 'natd'\n\toption wan_if 'unterminated\n")
    res = subprocess.run([str(debian_root / "usr/lib/igdpcp/need-config"), str(bad), "natd", "wan_if"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "unterminated" in res.stderr and str(bad) in res.stderr, res.stderr


# ---------------------------------------------------------------- OpenWrt feed Makefile

FEED = PKG / "openwrt"


def make_vars(mk: str) -> dict[str, str]:
    """Top-level and Package/ ``NAME:=value`` assignments of a feed Makefile (last one wins)."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s*([A-Z0-9_]+):=(.*)$", mk, re.M)}


@pytest.mark.parametrize("pkg, name", [("igdpcp", "igdpcp"), ("python-pyzmq", "python3-pyzmq"),
                                       ("python-nftables", "python3-nftables")])
def test_feed_package_makefiles(pkg: str, name: str) -> None:
    """packaging/openwrt is a feed (src-link): one directory per package, packages-feed style."""
    mk = (FEED / pkg / "Makefile").read_text()
    v = make_vars(mk)
    assert v["PKG_NAME"] == pkg and re.fullmatch(r"\d+(\.\d+)+", v["PKG_VERSION"]) and v["PKG_RELEASE"].isdigit()
    assert re.fullmatch(r"[0-9a-f]{64}", v["PKG_HASH"]), "PKG_HASH must be the tarball's sha256, not skip"
    assert "include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk" in mk
    assert re.search(rf"^\$\(eval \$\(call BuildPackage,{name}\)\)$", mk, re.M)
    recipes = re.sub(r"define Package/[^/\n]+/(postinst|prerm|postrm)\n.*?endef", "", mk, flags=re.S)
    assert not re.search(r"^\t+python3? ", recipes, re.M)  # the SDK's host python: $(HOST_PYTHON3_BIN)
    assert v["PKG_MAINTAINER"] and v["PKG_LICENSE"]
    test_sh = FEED / pkg / "test.sh"  # OpenWrt CI runs it on the device after install
    assert os.access(test_sh, os.X_OK) and f'"$1" = {name}' in test_sh.read_text()
    assert subprocess.run(["dash", "-n", str(test_sh)], timeout=30).returncode == 0
    if pkg == "python-pyzmq":  # Cython extension against the system libzmq-curve, from PyPI
        assert v["PYPI_NAME"] == "pyzmq" and "+libzmq-curve" in v["DEPENDS"].split()
        assert "ZMQ_PREFIX=$(STAGING_DIR)/usr" in mk and "python-cython/host" in v["PKG_BUILD_DEPENDS"]
        assert "$(call Py3Package,python3-pyzmq)" in mk and "PKGARCH" not in v
    if pkg == "python-nftables":  # the binding from nftables' py/, arch-all
        assert v["PKG_SOURCE"] == "nftables-$(PKG_VERSION).tar.bz2"
        assert v["PKG_SOURCE_URL"] == "https://netfilter.org/projects/nftables/files"
        assert sorted(v["DEPENDS"].split()) == ["+nftables-json", "+python3-ctypes", "+python3-light",
                                                "+python3-logging"]
        assert v["PKGARCH"] == "all" and "$(PKG_BUILD_DIR)/py/nftables.py" in mk


def test_openwrt_feed_makefile_matches_the_ipk(ipk: Path) -> None:
    mk = (FEED / "igdpcp" / "Makefile").read_text()
    v = make_vars(mk)
    assert v["PKGARCH"] == "all"
    version, release = ipk.name.split("_")[1].split("-")
    assert (v["PKG_VERSION"], v["PKG_RELEASE"]) == (version, release)
    assert v["PKG_SOURCE"] == "$(PKG_NAME)-$(PKG_VERSION).tar.gz" and "$(PKG_VERSION)" in v["PKG_SOURCE_URL"]
    assert v["PKG_SOURCE_URL"].startswith("https://") and "example" not in v["PKG_SOURCE_URL"]
    f = control_fields(ipk)
    assert sorted(d.lstrip("+") for d in v["DEPENDS"].split()) == sorted(f["Depends"].split(", ")), \
        "run: packaging/build-ipk --update-feed-makefile"
    assert v["CONFLICTS"].split() == f["Conflicts"].split(", ") and v["PROVIDES"].split() == f["Provides"].split(", ")
    assert v["USERID"] == f["Require-User"]
    assert "/etc/config/igdpcp" in group(r"define Package/igdpcp/conffiles\n(.*?)endef", mk, re.S)
    # the SDK package carries the same maintainer scripts ($ escaped for make)
    for define, name in (("postinst", "postinst-pkg"), ("prerm", "prerm-pkg"), ("postrm", "postrm")):
        body = group(rf"define Package/igdpcp/{define}\n(.*?)endef", mk, re.S)
        assert body.replace("$$", "$") == (PKG / "control" / name).read_text(), define


# A stand-in for the SDK's make machinery, just enough to run the feed Makefile's own recipes:
# BuildPackage runs Build/Compile and Package/<name>/install into $(DEST) (not OpenWrt's code).
SDK_SHIM = {
    "rules.mk": "INCLUDE_DIR:=$(TOPDIR)/include\nCP:=cp -fpR\nINSTALL_DIR:=install -d -m0755\n",
    "include/package.mk": "define BuildPackage\nall:\n\t$$(Build/Compile)\n\t$$(call Package/$(1)/install,$$(DEST))\n"
                          "endef\n",
    "feeds/packages/lang/python/python3-package.mk": f"HOST_PYTHON3_BIN:={sys.executable}\n",
}


def test_feed_recipe_installs_the_ipk_files_plus_bytecode(ipk: Path, tmp_path: Path) -> None:
    """The feed's Build/Compile and install, run by make on the release tarball (build-ipk
    --dist), give the standalone ipk's files, modes and bytes, plus bytecode for every module."""
    tarball = B.dist(tmp_path, "HEAD")  # what --dist writes, without touching PKG_HASH (committed tree)
    # a function of the content: the same bytes again, and no commit id inside
    assert B.dist(tmp_path / "again", "HEAD").read_bytes() == tarball.read_bytes()
    assert subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          timeout=30).stdout.strip().encode() not in gzip.decompress(tarball.read_bytes())
    with tarfile.open(tarball) as t:
        names = t.getnames()
        top = f"igdpcp-{B.project_version()}"
        assert all(n == top or n.startswith(f"{top}/") for n in names)
        assert not [n for n in names if "/packaging/openwrt" in n]  # the feed holds the hash
    (tmp_path / "src").mkdir()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tmp_path / "src")], check=True, timeout=60)
    sdk = tmp_path / "sdk"
    for rel, text in SDK_SHIM.items():
        (sdk / rel).parent.mkdir(parents=True, exist_ok=True)
        (sdk / rel).write_text(text)
    dest = tmp_path / "ipkg"
    res = subprocess.run(["make", "-s", "-f", str(FEED / "igdpcp" / "Makefile"), f"TOPDIR={sdk}",
                          f"PKG_BUILD_DIR={tmp_path / 'src' / f'igdpcp-{B.project_version()}'}", f"DEST={dest}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member(ipk, "./data.tar.gz")))) as t:
        want = {m.name[1:]: (m.mode, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]
    got = {"/" + p.relative_to(dest).as_posix(): p for p in dest.rglob("*") if p.is_file()}
    pyc = {k for k in got if "/__pycache__/" in k}
    assert {k: (p.stat().st_mode & 0o7777, p.read_bytes()) for k, p in got.items() if k not in pyc} == want
    modules = [k for k in want if k.endswith(".py")]
    tag = sys.implementation.cache_tag
    assert sorted(pyc) == sorted(
        f"{k.rsplit('/', 1)[0]}/__pycache__/{k.rsplit('/', 1)[1][:-3]}.{tag}.pyc" for k in modules)
    # the installed tree imports from that bytecode (checked-hash: valid whatever the mtimes)
    probe = subprocess.run([sys.executable, "-B", "-P", "-c", "import natd.nft as m; print(m.__cached__)"],
                           env={"PYTHONPATH": f"{dest}/usr/lib/igdpcp:{os.pathsep.join(sys.path[1:])}"},
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and Path(probe.stdout.strip()).exists(), probe.stderr


def test_stage_openwrt_equals_ipk_data(tmp_path: Path) -> None:
    """The feed Makefile installs build-ipk --stage: the same files, modes and bytes."""
    ipk = build(tmp_path / "ipk")
    root = tmp_path / "root"
    B.stage(root, "openwrt")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(member(ipk, "./data.tar.gz")))) as t:
        want = {m.name[1:]: (m.mode, extract(t, m)) for m in t.getmembers() if m.isfile()}
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
    restart with the new --wan-if; anything else: nothing (hotplug iface events)."""
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


def test_postrm_removes_fw4_layout_objects(tmp_path: Path) -> None:
    """In the fw4 layout natd's objects live inside `inet fw4`; removing the package must not
    leave its forwards active until some later fw4 reload."""
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
    script = os.path.join(os.path.dirname(__file__), "..", "..", "packaging", "control", "postrm")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls)}
    subprocess.run(["sh", script], env=env, check=True)
    assert "fw4 -q reload" in calls.read_text()
    calls.unlink()
    subprocess.run(["sh", script], env={**env, "IPKG_INSTROOT": "/tmp/rootfs"}, check=True)
    assert not calls.exists()  # nothing at image-build time


# ---------------------------------------------------------------- Debian hooks

def test_debian_tree_has_debian_hooks_not_openwrts(debian_root: Path) -> None:
    files = {"/" + p.relative_to(debian_root).as_posix() for p in debian_root.rglob("*") if p.is_file()}
    for path in ("/etc/dhcp/dhclient-exit-hooks.d/igdpcp", "/etc/dnsmasq.d/igdpcp",
                 "/usr/lib/igdpcp/dnsmasq-dhcp-script", "/usr/lib/igdpcp/pcp-server-option",
                 "/usr/lib/igdpcp/host-left"):
        assert path in files, path
    assert not [f for f in files if f.startswith(("/etc/udhcpc.user.d/", "/etc/hotplug.d/", "/etc/init.d/",
                                                   "/usr/share/nftables.d/", "/etc/config/"))]
    # the option-158 parser and the host-leave hook are the OpenWrt hooks' own bytes (one copy)
    assert (debian_root / "usr/lib/igdpcp/pcp-server-option").read_bytes() == \
        (PKG / "hooks" / "udhcpc-pcp-server").read_bytes()
    assert (debian_root / "usr/lib/igdpcp/host-left").read_bytes() == (PKG / "hooks" / "dhcp-release").read_bytes()
    conf = (debian_root / "etc/dnsmasq.d/igdpcp").read_text()
    assert "dhcp-script=/usr/lib/igdpcp/dnsmasq-dhcp-script" in conf.splitlines()


@pytest.mark.parametrize("reason, option, expect", [
    ("BOUND", "4:64:40:0:1", "100.64.0.1\n"),  # dhclient's unpadded hex
    ("RENEW", "04:64:40:00:01:08:c6:33:64:01:c6:33:64:02", "100.64.0.1\n198.51.100.1 198.51.100.2\n"),
    ("REBIND", "8:e0:0:0:1:64:40:0:1", "100.64.0.1\n"),  # multicast dropped (RFC 7291 §4)
    ("BOUND", "5:64:40:0:1:2", None),  # malformed: no file
    ("BOUND", '"printable?"', None),  # not hex at all: no file
    ("BOUND", "", None),  # server sent no option 158
    ("RELEASE", "4:64:40:0:1", None),
    ("EXPIRE", "", None),
    ("PREINIT", "", "old\n"),  # other events leave the file alone
])
def test_dhclient_exit_hook_writes_the_pcp_server_file(debian_root: Path, tmp_path: Path, reason: str,
                                                       option: str, expect: str | None) -> None:
    """Sourced as dhclient-script does, with its variables: the file controld reads follows
    option 158, and the sourcing shell goes on afterwards (no exit, no leftover variables)."""
    hook = (debian_root / "etc/dhcp/dhclient-exit-hooks.d/igdpcp").read_text()
    hook = hook.replace("/usr/lib/igdpcp/pcp-server-option", str(debian_root / "usr/lib/igdpcp/pcp-server-option"))
    (tmp_path / "hook").write_text(hook)
    out = tmp_path / "run" / "pcp-server"
    out.parent.mkdir()
    out.write_text("old\n")
    res = subprocess.run(["dash", "-c", f'. "{tmp_path}/hook"; echo "after ${{igdpcp_event-unset}}"'],
                         env={"PATH": "/usr/bin:/bin", "reason": reason, "interface": "eth1",
                              "new_pcp_server": option, "IGDPCP_PCP_SERVER_FILE": str(out)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "after unset\n", res.stdout + res.stderr
    assert (out.read_text() if out.exists() else None) == expect


@pytest.mark.parametrize("argv, expect", [
    (["del", "aa:bb:cc:dd:ee:ff", "192.168.1.20", "laptop"], "host-left 192.168.1.20 --socket "
                                                              "/var/run/igdpcp/controld.sock"),
    (["add", "aa:bb:cc:dd:ee:ff", "192.168.1.20", "laptop"], None),
    (["old", "aa:bb:cc:dd:ee:ff", "192.168.1.20"], None),
    (["del", "aa:bb:cc:dd:ee:ff", "fd00::20"], None),  # IPv4 mappings only
])
def test_dnsmasq_dhcp_script_reports_host_leave(debian_root: Path, tmp_path: Path, argv: list[str],
                                                expect: str | None) -> None:
    script = (debian_root / "usr/lib/igdpcp/dnsmasq-dhcp-script").read_text()
    script = script.replace("/usr/lib/igdpcp/host-left", str(debian_root / "usr/lib/igdpcp/host-left"))
    (tmp_path / "script").write_text(script)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "igdpcp").write_text(f'#!/bin/sh\necho "$*" > "{tmp_path}/called"\n')
    (bin_ / "igdpcp").chmod(0o755)
    res = subprocess.run(["dash", str(tmp_path / "script"), *argv], env={"PATH": f"{bin_}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    called = tmp_path / "called"
    assert (called.read_text().strip() if called.exists() else None) == expect


# ---------------------------------------------------------------- postinst: dnsmasq's DHCP handler

@pytest.mark.parametrize("conf, instroot, restarts", [
    ("port=53\n", "", True),  # dnsmasq runs without dhcp-script: ours is its first handler
    ("port=53\ndhcp-script=/usr/lib/dnsmasq/dhcp-script.sh\n", "", False),  # it already runs handlers
    (None, "", False),  # dnsmasq not running: its next start sees our handler
    ("port=53\n", "/tmp/rootfs", False),  # image build: nothing runs
])
def test_postinst_restarts_dnsmasq_once_for_the_new_dhcp_handler(tmp_path: Path, conf: str | None,
                                                                  instroot: str, restarts: bool) -> None:
    """OpenWrt's dnsmasq init adds dhcp-script only when a /etc/hotplug.d/dhcp handler exists
    at its start; without a restart our host-leave handler would never run."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    for name in ("dnsmasq", "logger"):
        (bin_ / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (bin_ / name).chmod(0o755)
    (tmp_path / "90-igdpcp").write_text("#!/bin/sh\n")
    if conf is not None:
        (tmp_path / "dnsmasq.conf.cfg01411c").write_text(conf)
    script = (PKG / "control" / "postinst-pkg").read_text()
    for real, fake in (("/etc/init.d/dnsmasq", bin_ / "dnsmasq"),
                       ("/etc/hotplug.d/dhcp/90-igdpcp", tmp_path / "90-igdpcp"),
                       ("/var/etc/dnsmasq.conf", tmp_path / "dnsmasq.conf")):
        assert real in script
        script = script.replace(real, str(fake))
    res = subprocess.run(["dash", "-c", script], env={"PATH": f"{bin_}:/usr/bin:/bin", "IPKG_INSTROOT": instroot},
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    got = calls.read_text().splitlines() if calls.exists() else []
    assert ("dnsmasq restart" in got) == restarts, got


def _ipk_root(ipk: Path, root: Path) -> set[str]:
    """The ipk's data unpacked under ``root`` (tar, as opkg's own untar would); its file paths."""
    root.mkdir()
    (root / "data.tar.gz").write_bytes(member(ipk, "./data.tar.gz"))
    subprocess.run(["tar", "-xzf", str(root / "data.tar.gz"), "-C", str(root)], check=True, timeout=60)
    (root / "data.tar.gz").unlink()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_ipk_compiles_its_bytecode_at_install_and_takes_it_away_at_removal(ipk: Path, tmp_path: Path) -> None:
    """The ipk ships sources only (version-neutral); postinst-pkg compiles them for the router's
    python3, which the launchers' python3 -B then reads; prerm-pkg removes what no package list
    names, and leaves the feed package's own bytecode. Nothing happens in an image build."""
    root = tmp_path / "root"
    shipped = _ipk_root(ipk, root)
    lib = root / "usr/lib/igdpcp"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").symlink_to(sys.executable)
    (bin_ / "logger").write_text(f'#!/bin/sh\necho "logger $*" >> "{tmp_path / "calls"}"\n')
    (bin_ / "logger").chmod(0o755)
    post = (PKG / "control" / "postinst-pkg").read_text()
    for real in ("/usr/lib/igdpcp", "/etc/init.d/dnsmasq", "/etc/hotplug.d/dhcp/90-igdpcp", "/var/etc/dnsmasq.conf"):
        assert real in post
        post = post.replace(real, str(root) + real)

    def run(script: str, instroot: str) -> None:
        res = subprocess.run(["dash", "-c", script], env={"PATH": f"{bin_}:/usr/bin:/bin", "IPKG_INSTROOT": instroot},
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr

    def pycs() -> list[Path]:
        return sorted(lib.rglob("*.pyc"))

    run(post, "/tmp/image-root")  # an image build: the host's python3 is not the router's
    assert pycs() == []
    run(post, "")
    tag = sys.implementation.cache_tag
    modules = sorted(lib.rglob("*.py"))
    assert modules and [p for p in modules if not (p.parent / "__pycache__" / f"{p.stem}.{tag}.pyc").exists()] == []
    assert {p.read_bytes()[4:8] for p in pycs()} == {b"\x03\x00\x00\x00"}  # checked-hash: any install mtime
    probe = subprocess.run([sys.executable, "-B", "-P", "-c", "import controld.main as m; print(m.__cached__)"],
                           env={"PYTHONPATH": f"{lib}:{os.pathsep.join(sys.path[1:])}"},
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and Path(probe.stdout.strip()).exists(), probe.stderr
    stamps = {p: p.stat().st_mtime_ns for p in pycs()}
    run(post, "")  # bytecode there already (the feed package's, or a second run): left as it is
    assert {p: p.stat().st_mtime_ns for p in pycs()} == stamps
    prerm = (PKG / "control" / "prerm-pkg").read_text()
    listed = root / "usr/lib/opkg/info/igdpcp.list"
    listed.parent.mkdir(parents=True)
    listed.write_text("".join(f"/{p.relative_to(root)}\n" for p in pycs()))  # the feed package owns them
    run(prerm, str(root))
    assert {p: p.stat().st_mtime_ns for p in pycs()} == stamps
    listed.write_text("".join(f"/{f}\n" for f in sorted(shipped)))  # the ipk's own list: sources only
    run(prerm, str(root))
    assert pycs() == [] and not list(lib.rglob("__pycache__"))
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {str(listed.relative_to(root))} \
        == shipped


def test_debian_unit_writes_a_persistent_uuid_once(debian_root: Path, tmp_path: Path) -> None:
    """ExecStartPre=+ensure-uuid: an empty uuid gets one, written into the config; the next
    start keeps it; controld's parser reads it from the file."""
    from controld.main import build_parser

    units = (debian_root / "lib/systemd/system/igdpcp-controld.service").read_text()
    assert "ExecStartPre=+/usr/lib/igdpcp/ensure-uuid /etc/igdpcp/igdpcp controld" in units
    conf = tmp_path / "igdpcp"
    conf.write_text(sample_config("debian"))
    conf.chmod(0o640)
    before = conf.read_text()
    tool = str(debian_root / "usr/lib/igdpcp/ensure-uuid")
    first = subprocess.run([tool, str(conf), "controld"], capture_output=True, text=True, timeout=30, check=True)
    made = first.stdout.strip()
    assert str(uuid.UUID(made)) == made and oct(conf.stat().st_mode & 0o777) == "0o640"
    after = conf.read_text()
    assert after.replace(f"\toption uuid '{made}'\n", "", 1) == before  # nothing else changed
    again = subprocess.run([tool, str(conf), "controld"], capture_output=True, text=True, timeout=30, check=True)
    assert again.stdout.strip() == made and conf.read_text() == after
    ns = parse_args_with_config(build_parser(), ["--config", str(conf), "--lan-if", "br-lan"], "controld")
    assert ns.uuid == made
    broken = subprocess.run([tool, str(tmp_path / "missing"), "controld"], capture_output=True, text=True, timeout=30)
    assert broken.returncode == 0 and "no persistent UUID" in broken.stderr
