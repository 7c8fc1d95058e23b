"""controld's admin API: newline-delimited JSON on a Unix socket (docs/operating.md).

``backend`` is the interface the core implements, ``protocol`` the command table
(sans-I/O), ``server`` the socket edge, ``client`` what the CLI and rpcd use.
"""
