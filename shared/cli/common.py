"""What every command shares: the consoles, JSON output and the user-error convention."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

from rich.console import Console

__all__ = ["console", "err_console", "fail", "print_json"]

# Tables stay readable when output goes to a file or a CI log (Rich assumes 80 columns there).
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, with nothing else (for scripts and CI)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def fail(message: str, *, code: int = 1) -> NoReturn:
    """Print one line, ``error: <message>``, on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise SystemExit(code)
