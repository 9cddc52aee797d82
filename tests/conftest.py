"""Shared pytest fixtures. Keep fixtures small and made in the test (tiny random models)."""
from __future__ import annotations

import os

# Tests never reach a model hub: everything is made locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
