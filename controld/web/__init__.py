"""The LAN web page: a pure request handler over the admin backend (docs/operating.md, "the page")."""
