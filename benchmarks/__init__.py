"""The benchmarks: scripts run as `python -m benchmarks.<name>` or `python benchmarks/<name>.py`."""
