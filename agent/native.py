"""agent/_jsonlines.c, built by pip with cniflow and loaded once through ctypes: the C
of the decoder (scan_records) and of the JSON lines (format_lines, format_records).
Each user declares the signatures it calls."""

from __future__ import annotations

import ctypes
import importlib.machinery
from functools import cache
from pathlib import Path


@cache
def library() -> ctypes.CDLL:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_jsonlines{suffix}"
        if path.exists():
            return ctypes.CDLL(str(path))
    raise ImportError(f"agent/_jsonlines.c is not built in {here}: run scripts/setup.sh")
