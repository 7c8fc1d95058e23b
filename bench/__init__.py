"""igdpcp's benchmark harness: ``bench/run`` or ``python -m bench`` (see bench/harness.py)."""
