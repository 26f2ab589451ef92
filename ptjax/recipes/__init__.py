"""End-to-end runs that configs name with `config.trainer` (see `launch.py`)."""
