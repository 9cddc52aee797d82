#!/usr/bin/env python3
"""``python bench/run.py gpu_check`` entry: runs bench/gpu_check.py (the device check) unchanged."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).with_name("gpu_check.py")), run_name="__main__")
