"""Measurement: each policy applied to ALL answers (placeholder; filled in below)."""
from __future__ import annotations


def add_arguments(ap) -> None:
    pass


def main(args) -> int:
    raise SystemExit("bench: not implemented yet")
