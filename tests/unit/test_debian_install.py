"""packaging/README.md's Debian steps, run line by line against a scratch root.

Each line of the README's shell block is executed as written, pointed at the scratch root
instead of / (apt is simulated: `apt-get -s` resolves the packages in Debian's own archive
without installing them). A line this test does not know fails it, so the README and the
test cannot drift apart. The daemons themselves are not started here (tests/netns/test_install.py
runs them from an installed tree).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "packaging" / "README.md"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, not the venv's: the steps need nothing else


def debian_steps() -> list[str]:
    """The shell lines of the README's Debian block (comments and blanks dropped)."""
    text = README.read_text()
    block = re.search(r"^## Debian-style routers.*?^```sh\n(.*?)^```", text, re.S | re.M)
    assert block, "packaging/README.md: no ```sh block under '## Debian-style routers'"
    return [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]


def need_config(root: Path, unit: str) -> subprocess.CompletedProcess:
    """The unit's ExecCondition, run as systemd would (against the scratch root's files)."""
    text = (root / "lib/systemd/system" / unit).read_text()
    argv = re.search(r"^ExecCondition=(.*)$", text, re.M)[1].split()  # type: ignore[index]
    argv = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.skipif(not (shutil.which("apt-get") and shutil.which("systemd-sysusers") and shutil.which("systemctl")
                         and Path(SYSTEM_PYTHON).exists()), reason="needs a Debian host (apt, systemd tools)")
def test_readme_debian_steps_install_a_working_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc/dhcp").mkdir(parents=True)
    ran: list[str] = []
    for line in debian_steps():
        cmd = line.split("#", 1)[0].strip() if not line.startswith(("sed ", "printf ")) else line
        words = cmd.split()
        if words[:2] == ["apt", "install"]:
            pkgs = words[2:]
            res = subprocess.run(["apt-get", "install", "-s", "--no-install-recommends", *pkgs],
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr  # every name resolves in Debian's archive
            for pkg in pkgs:
                show = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True,
                                      timeout=60)
                assert show.returncode == 0 and re.search(r"^Package: ", show.stdout, re.M), pkg
            argv = None
        elif words[:2] == ["python3", "packaging/build-ipk"]:
            assert words[2:] == ["--stage", "/", "--flavour", "debian"], cmd
            argv = [SYSTEM_PYTHON, "packaging/build-ipk", "--stage", str(root), "--flavour", "debian"]
        elif words == ["systemd-sysusers", "igdpcp.conf"]:
            argv = ["systemd-sysusers", f"--root={root}", "igdpcp.conf"]
        elif words == ["systemctl", "daemon-reload"]:
            argv = None  # nothing running to reload in a scratch root
        elif words[:3] == ["systemctl", "enable", "--now"]:
            # before: every unit refuses for want of its devices; 'enable' itself must work
            argv = ["systemctl", f"--root={root}", "enable", *words[3:]]
        elif words[0] in ("sed", "printf"):
            argv = ["bash", "-c", cmd.replace(" /etc/", f" {root}/etc/")]
            if words[0] == "sed":
                for unit in ("igdpcp-natd.service", "igdpcp-controld.service"):
                    res = need_config(root, unit)
                    assert res.returncode == 1 and "igdpcp: not started: set option" in res.stderr, res
        else:
            raise AssertionError(f"packaging/README.md Debian step this test does not know: {line!r}")
        if argv is not None:
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            assert res.returncode == 0, (line, res.stdout, res.stderr)
        ran.append(words[0])
    assert ran[:3] == ["apt", "python3", "systemd-sysusers"] and "sed" in ran and "systemctl" in ran

    # what the steps made: users, enabled units, set devices, dhclient asking for option 158
    assert re.search(r"^igdpcp:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M)
    assert re.search(r"^igdpcp:x:\d+:igdpcp-natd$", (root / "etc/group").read_text(), re.M)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert sorted(p.name for p in wants.iterdir()) == ["igdpcp-controld.service", "igdpcp-natd.service"]
    for unit in ("igdpcp-natd.service", "igdpcp-controld.service", "igdpcp-controld@.service"):
        res = need_config(root, unit)
        assert (res.returncode, res.stderr) == (0, ""), res
    conf = (root / "etc/igdpcp/igdpcp").read_text()
    assert conf.count("\toption lan_if 'br-lan'") == 2 and conf.count("\toption wan_if 'eth1'") == 1
    dhclient = (root / "etc/dhcp/dhclient.conf").read_text()
    assert "option pcp-server code 158 = string;" in dhclient and "also request pcp-server;" in dhclient
    assert (root / "etc/dhcp/dhclient-exit-hooks.d/igdpcp").exists()
    assert not (root / "etc/udhcpc.user.d").exists() and not (root / "etc/hotplug.d").exists()
    # the staged launcher runs under Debian's python (--version needs no third-party module)
    res = subprocess.run([str(root / "usr/sbin/igdpcp-natd"), "--version"], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert res.stdout.startswith("igdpcp-natd "), res.stderr
