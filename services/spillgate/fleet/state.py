"""The fleet's state directory: what a running `spillgate up` shares with other commands.

Layout (default `$SPILLGATE_STATE_DIR`, else `./.spillgate`)::

    lock             flock()ed by the live supervisor: one fleet per state directory
    fleet.json       supervisor pid, phase (starting/healthy/stopping/stopped/failed),
                     children (name -> pid, kind, region, exit status)
    endpoints.json   the endpoint table (`spillgate endpoints --json`); only while healthy
    logs/NAME.log    each child's stdout+stderr; logs/supervisor.log for `up --detach`
    registry.db      the registry's SQLite store (recreated by every `up`)
    keys.db          the gateways' API key store; dev-key: a key for `spillgate chat` (0600)
    replica-R.toml   the simulator config of region R's replicas
    envoy/NODE.yaml  each Envoy's rendered bootstrap; envoy/NODE.admin its admin address

Files are replaced atomically (write + rename), so readers never see half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ENV = "SPILLGATE_STATE_DIR"
DEFAULT_DIR = ".spillgate"


def default_state_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_DIR)


class FleetRunning(Exception):
    """Another supervisor holds this state directory."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.json"

    @property
    def endpoints_file(self) -> Path:
        return self.root / "endpoints.json"

    @property
    def registry_db(self) -> Path:
        return self.root / "registry.db"

    @property
    def keys_db(self) -> Path:
        return self.root / "keys.db"

    @property
    def dev_key(self) -> Path:
        return self.root / "dev-key"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def replica_config(self, region: str) -> Path:
        return self.root / f"replica-{region}.toml"

    def create(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)

    def lock(self) -> IO[str]:
        """Take the directory's lock for the caller's lifetime (the returned file holds it).

        Raises FleetRunning when a live supervisor has it. The kernel drops the lock when the
        holder dies, however it dies, so a stale fleet.json never blocks a new `up`.
        """
        self.create()
        handle = (self.root / "lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = (self.read_fleet() or {}).get("pid", "?")
            raise FleetRunning(
                f"a fleet is already running from {self.root} (supervisor pid {pid}); "
                "`spillgate down` stops it"
            ) from None
        return handle

    def locked(self) -> bool:
        """Whether a live supervisor holds the lock."""
        try:
            handle = (self.root / "lock").open("a+")
        except OSError:
            return False
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def write_json(self, path: Path, body: Any, mode: int = 0o644) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def read_fleet(self) -> dict[str, Any] | None:
        return self._read_json(self.fleet_file)

    def read_endpoints(self) -> dict[str, Any] | None:
        return self._read_json(self.endpoints_file)

    def write_secret(self, path: Path, text: str) -> None:
        """A file only the user can read (0600 from creation, never wider)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def clear_run_files(self) -> None:
        """Remove what a previous run left: endpoints, registry store, keys, configs."""
        for path in (self.endpoints_file, self.dev_key, self.keys_db):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in self.root.glob("registry.db*"):
            path.unlink()
        for path in self.root.glob("keys.db*"):
            path.unlink()
