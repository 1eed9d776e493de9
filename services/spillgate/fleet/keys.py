"""The fleet's dev API key, made through the gateway's public key CLI contract.

`spillgate keys create --store FILE --tenant T` prints the new key alone on stdout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class KeyCreateError(Exception):
    """The key CLI failed; the message carries its stderr."""


def create_dev_key(store: Path, tenant: str, cwd: Path) -> str:
    """Create a key for `tenant` in `store` and return it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillgate.cli",
            "keys",
            "create",
            "--store",
            str(store),
            "--tenant",
            tenant,
            # A local demo key: bursts that show overflow and shedding must not be stopped
            # by the tenant rate limit first.
            "--rps",
            "1000",
            "--burst",
            "2000",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=30,
        check=False,
    )
    key = done.stdout.strip()
    if done.returncode != 0 or not key or len(key.split()) != 1:
        raise KeyCreateError(
            f"`spillgate keys create` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return key
