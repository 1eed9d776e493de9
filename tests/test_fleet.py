"""The local fleet: spec validation, and `spillgate up` / `down` / `endpoints` / `status` /
`chat` as real processes (small specs, fast simulators)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spillgate._proto import common_pb2
from spillgate.fleet.spec import FleetSpecError, load_fleet_spec, parse_fleet_spec
from spillgate.fleet.state import pid_alive
from spillgate.fleet.status import merge_summaries
from tests.conftest import ROOT, eventually

REGISTRY_PART = """
[[model]]
id = "llm-small"
kind = "llm"
max_context_tokens = 4096
max_output_tokens = 256

[[version]]
model = "llm-small"
version = "v1"
artifact_digest = "sha256:ef8d411f7b363086d030127e527a00e28497aaca039474147b6b2e5598e9afb0"
triton_model_name = "llm-small"

[[alias]]
name = "chat"
default_targets = [{ model = "llm-small", version = "v1", weight = 100 }]
"""


def fleet_spec(
    replicas: dict[str, int], speed: float = 50.0, admissions: dict[str, int] | None = None
) -> str:
    """A spec with these regions (id -> replica count, and admission instances where not
    1), llm-small placed everywhere."""
    parts = [f"[fleet]\nspeed = {speed}\nlease_ms = 600\nstartup_timeout_s = 30\n"]
    for rid, n in replicas.items():
        rtt = ", ".join(f"{p} = 80" for p in replicas if p != rid)
        parts.append(
            f'[[region]]\nid = "{rid}"\nresidency_zone = "{rid}"\n'
            f"rtt_ms = {{ {rtt} }}\nreplicas = {n}\nadmissions = {(admissions or {}).get(rid, 1)}\n"
        )
    parts.append(REGISTRY_PART)
    for rid in replicas:
        parts.append(
            f'[[placement]]\nmodel = "llm-small"\nversion = "v1"\nregion = "{rid}"\n'
            f'pool = "default"\nmin_replicas = 1\nmax_replicas = 4\n'
        )
    return "\n".join(parts)


# -- spec ---------------------------------------------------------------------------------


def test_built_in_spec_is_three_uneven_regions_with_published_rtts() -> None:
    spec = load_fleet_spec(None)
    assert [(r.id, r.replicas) for r in spec.regions] == [("us", 4), ("eu", 2), ("apac", 1)]
    us = spec.region_entity("us").region
    assert dict(us.rtt_ms) == {"eu": 80.5, "apac": 145.3}
    assert spec.budget_ms("normal") == 1200
    assert spec.envoy and spec.emulate_rtt
    assert not parse_fleet_spec(
        fleet_spec({"us": 1}).replace("[fleet]", "[fleet]\nenvoy = false")
    ).envoy
    models = {e.model.id: e.model for e in spec.entities if e.WhichOneof("entity") == "model"}
    assert models["llm-large"].fallback_model == "llm-small"
    assert 'load = ["llm-large", "llm-small"]' in spec.replica_config_text("apac")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("speed = 50.0", "speed = 0"), "fleet.speed must be a number > 0"),
        (lambda s: s.replace("[fleet]", "[fleet]\nspeeed = 2"), "fleet: unknown key(s) speeed"),
        (lambda s: s.replace("replicas = 2", 'replicas = "2"'), "region[0].replicas must be an"),
        (lambda s: s.replace("rtt_ms = { eu = 80 }", "rtt_ms = {}"), "region[0].rtt_ms: missing"),
        (lambda s: s.replace("eu = 80", "mars = 80"), "region[0].rtt_ms.mars: not another"),
        (lambda s: s + '\n[[replica]]\nid = "x"\n', "[[replica]] tables are not allowed"),
        (lambda s: s + "\n[sla]\nbudget_ms = { urgent = 5 }\n", "sla.budget_ms.urgent"),
        (lambda s: s.replace('kind = "llm"', 'kind = "llmm"'), "model[0].kind: unknown value"),
        (
            lambda s: s.replace('region = "eu"', 'region = "mars"'),
            "placement[1].region: unknown region 'mars'",
        ),
        (
            lambda s: s.replace('triton_model_name = "llm-small"', 'triton_model_name = "nope"'),
            "load names unknown model(s) ['nope']",
        ),
        (
            lambda s: s.replace('id = "us"\n', 'id = "us"\ngateway_endpoint = "x:1"\n'),
            "region[0].gateway_endpoint: leave it out",
        ),
        (lambda s: s.replace("[fleet]", "[fleet"), "not valid TOML"),
        (lambda s: s.replace("[fleet]", '[fleet]\nenvoy = "yes"'), "fleet.envoy must be true"),
        (lambda s: s.replace("admissions = 1", "admissions = 0", 1), "region[0].admissions"),
        (lambda s: s.replace("admissions = 1", "admissions = 9", 1), "at most 8, got 9"),
        (
            lambda s: s.replace("admissions = 1", "admissions = 2", 1).replace(
                "[fleet]", "[fleet]\nenvoy = false"
            ),
            "2 instances need fleet.envoy = true",
        ),
        (
            lambda s: s.replace('id = "us"\n', 'id = "us"\nadmission_endpoints = ["x:1"]\n'),
            "region[0].admission_endpoints: leave it out",
        ),
    ],
)
def test_spec_errors_name_the_field(edit: object, message: str) -> None:
    text = edit(fleet_spec({"us": 2, "eu": 1}))  # type: ignore[operator]
    with pytest.raises(FleetSpecError) as err:
        parse_fleet_spec(text, "my.toml")
    assert str(err.value).startswith("my.toml: ")
    assert message in str(err.value)


def test_region_without_placement_is_refused() -> None:
    text = fleet_spec({"us": 1, "eu": 1}).replace('region = "eu"', 'region = "us"')
    with pytest.raises(FleetSpecError, match="region 'eu' runs 1 replica"):
        parse_fleet_spec(text)


def test_status_adds_up_the_counters_of_a_regions_admission_instances() -> None:
    def summary(shed: int, overflow_in: int, queue: int) -> common_pb2.RegionSummary:
        return common_pb2.RegionSummary(
            region="us", healthy_replicas=4, shed_total=shed, overflow_in_total=overflow_in,
            overflow_out_total=1, queue_depth=queue,
        )  # fmt: skip

    merged = merge_summaries([summary(2, 5, 1), None, summary(3, 0, 4)])
    assert merged is not None
    assert (merged.shed_total, merged.overflow_in_total, merged.overflow_out_total) == (5, 5, 2)
    assert merged.queue_depth == 5 and merged.healthy_replicas == 4  # scraped: not summed
    assert merge_summaries([None, None]) is None  # no instance answered


# -- processes ----------------------------------------------------------------------------


def spillgate(*args: str, state: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spillgate.cli", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


class Up:
    """`spillgate up` in the foreground, its output collected line by line."""

    def __init__(self, spec: Path, state: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spillgate.cli",
                "up",
                "-f",
                str(spec),
                "--state-dir",
                str(state),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._pump.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def child_pids(state: Path) -> list[int]:
    fleet = json.loads((state / "fleet.json").read_text())
    return [int(c["pid"]) for c in fleet["children"].values()]


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        got = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(got.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(fleet_spec({"us": 2, "eu": 1}))
    return path


@pytest.fixture
def up(spec_file: Path, tmp_path: Path) -> Iterator[Up]:
    fleet = Up(spec_file, tmp_path / "state", "--no-envoy")
    try:
        yield fleet
    finally:
        fleet.close()


def test_up_starts_a_healthy_fleet_reports_a_crash_and_stops_everything(
    up: Up, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    eventually(lambda: "down`) stops the fleet" in up.text, timeout=40)
    text = up.text
    for progress in (
        "registry      ready",
        "spec applied",
        "registered (3/3)",
        "admission us   ready",
        "admissions    serving",
        "envoy         skipped (--no-envoy",
    ):
        assert progress in text, text
    assert "REGION  COMPONENT" in text and "replica us-1" in text
    body = json.loads((state / "endpoints.json").read_text())
    assert set(body["regions"]) == {"us", "eu"}
    assert [r["id"] for r in body["regions"]["us"]["replicas"]] == ["us-0", "us-1"]
    assert serving(body["registry"]["grpc"])
    for region in body["regions"].values():
        assert serving(region["admission"]["grpc"])
        assert serving(region["gateway"]["grpc"])
    pids = child_pids(state)
    assert len(pids) == 1 + 3 + 2 + 2
    assert all(pid_alive(p) for p in pids)

    # The registry holds every replica, with the region's endpoints applied.
    got = spillgate("endpoints", "--json", state=state)
    assert got.returncode == 0 and json.loads(got.stdout) == body
    status = spillgate("status", state=state)
    assert status.returncode == 0, status.stderr
    assert "us-1" in status.stdout and "OVERFLOW_IN" in status.stdout

    victim = body["regions"]["eu"]["replicas"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: "replica-eu-0 (pid" in up.text and "killed by SIGKILL" in up.text)
    assert "spillgate replica ready" in up.text.split("replica-eu-0 (pid")[1]  # its log tail
    eventually(
        lambda: (
            not json.loads((state / "endpoints.json").read_text())["regions"]["eu"]["replicas"][0][
                "alive"
            ]
        )
    )

    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0  # a requested stop of a healthy fleet
    assert "fleet stopped: no process left" in up.text
    assert not [p for p in pids if pid_alive(p)]
    assert not (state / "endpoints.json").exists()
    assert spillgate("endpoints", state=state).returncode == 1


def test_a_child_failing_at_start_fails_up_with_its_log(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(fleet_spec({"us": 1}))
    # Every admission process of this run dies at start (sitecustomize runs before main).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if b'spillgate.admission.app' in open('/proc/self/cmdline', 'rb').read():\n"
        "    print('simulated admission failure', flush=True)\n"
        "    os._exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "spillgate.cli",
            "up",
            "-f",
            str(spec),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-gateway",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "start failed: admission-us exited during start-up (exit status 3)" in done.stdout
    assert "simulated admission failure" in done.stdout and "admission-us.log" in done.stdout
    assert "fleet failed: no process left" in done.stdout


def test_detach_then_down_and_supervisor_death_leaves_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(fleet_spec({"us": 1, "eu": 1}))
    state = tmp_path / "state"
    started = spillgate("up", "-f", str(spec), "--detach", "--no-envoy", state=state)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "fleet healthy" in started.stdout and "replica eu-0" in started.stdout
    again = spillgate("up", "-f", str(spec), "--detach", state=state)
    assert again.returncode == 1 and "already running" in again.stderr
    body = json.loads(spillgate("endpoints", "--json", state=state).stdout)
    pids = [body["supervisor_pid"], *child_pids(state)]
    assert all(pid_alive(p) for p in pids)
    down = spillgate("down", state=state)
    assert down.returncode == 0 and "no process left" in down.stdout, down.stdout
    assert not [p for p in pids if pid_alive(p)]
    assert "no fleet is running" in spillgate("down", state=state).stdout

    # SIGKILL of the supervisor itself: the children die with it (PR_SET_PDEATHSIG), Envoy
    # (exec'ed by the same launcher) included.
    started = spillgate("up", "-f", str(spec), "--detach", state=state)
    assert started.returncode == 0, started.stdout + started.stderr
    children = json.loads((state / "fleet.json").read_text())["children"]
    assert sorted(n for n, c in children.items() if c["kind"] == "envoy") == [
        "envoy-ingress-eu",
        "envoy-ingress-us",
        "envoy-mesh-eu",
        "envoy-mesh-us",
    ]
    pids = child_pids(state)
    supervisor = json.loads((state / "fleet.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGKILL)
    eventually(lambda: not [p for p in pids if pid_alive(p)], timeout=10)


def test_chat_streams_and_reports_the_route(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.toml"
    spec.write_text(fleet_spec({"us": 1, "apac": 1}))
    state = tmp_path / "state"
    assert spillgate("up", "-f", str(spec), "--detach", "--no-envoy", state=state).returncode == 0
    try:
        key = state / "dev-key"
        assert key.stat().st_mode & 0o777 == 0o600
        got = spillgate("chat", "Hello there", "--region", "apac", state=state)
        assert got.returncode == 0, got.stderr
        assert "routed: region=apac" in got.stdout
    finally:
        spillgate("down", state=state)


def test_commands_without_a_fleet_say_so(tmp_path: Path) -> None:
    for command in ("endpoints", "status", "chat"):
        args = [command, "hi"] if command == "chat" else [command]
        got = spillgate(*args, state=tmp_path)
        assert got.returncode == 1 and "no fleet is running" in got.stderr, got
    assert spillgate("up", "-f", str(tmp_path / "missing.toml"), state=tmp_path).returncode == 2
