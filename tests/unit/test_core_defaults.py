"""Each default is declared once, in shared/config.py's OPTIONS: the core's settings without a
command line are the ones a bare command line gives."""

from __future__ import annotations

import dataclasses

from controld import main as controld_main
from controld.core.policy import Policy
from controld.core.service import IwfConfig

BARE = ["--lan-if", "br-lan", "--rpc", "ipc:///x", "--events", "ipc:///y", "--state-dir", "/tmp/x"]


def test_iwf_config_defaults_are_the_option_table_s() -> None:
    args = controld_main.build_parser().parse_args(BARE)
    from_cli = IwfConfig.from_args(args)
    assert from_cli.pcp_server_file  # the table's path; IwfConfig() alone reads no file
    assert dataclasses.replace(from_cli, pcp_server_file=None) == IwfConfig()


def test_policy_defaults_are_the_option_table_s() -> None:
    assert controld_main._policy(controld_main.build_parser().parse_args(BARE)) == Policy()
