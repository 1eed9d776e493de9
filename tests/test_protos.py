"""The generated code in services/spillgate/_proto matches protos/, and the check can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import timestamp_pb2

from spillgate._proto import common_pb2, registry_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gen_protos.py"
PROTOS = REPO_ROOT / "protos"
COMMITTED = REPO_ROOT / "services" / "spillgate" / "_proto"


def gen_protos(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def test_committed_code_is_up_to_date() -> None:
    result = gen_protos("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_reports_a_changed_proto(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTOS, protos)
    common = protos / "spillgate" / "v1" / "common.proto"
    anchor = "  uint32 cached_tokens = 3;\n}\n"
    text = common.read_text()
    assert anchor in text, "test anchor moved: update this test"
    common.write_text(text.replace(anchor, anchor[:-2] + "  uint32 reasoning_tokens = 4;\n}\n"))
    (protos / "spillgate" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\npackage spillgate.v1;\nmessage Extra {}\n'
    )
    before = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}

    result = gen_protos("--check", "--protos", str(protos), "--out", str(COMMITTED))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "differs: common_pb2.py" in result.stderr
    assert "differs: common_pb2.pyi" in result.stderr
    assert "reasoning_tokens" in result.stderr
    assert "missing: extra_pb2.py" in result.stderr
    after = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    assert after == before, "--check must not write"


def test_write_flattens_keeps_init_and_removes_stale(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    out.mkdir()
    (out / "__init__.py").write_text('"""keep me"""\n')
    (out / "gone_pb2.py").write_text("# stale\n")
    (out / "gone_pb2_grpc.pyi").write_text("# stale\n")

    result = gen_protos("--out", str(out))

    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "__init__.py").read_text() == '"""keep me"""\n'
    assert not (out / "gone_pb2.py").exists()
    assert not (out / "gone_pb2_grpc.pyi").exists()
    written = sorted(p.name for p in out.iterdir())
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_file())
    assert written == committed
    registry_grpc = (out / "registry_pb2_grpc.py").read_text()
    assert "from spillgate._proto import registry_pb2" in registry_grpc
    assert "from spillgate.v1 import" not in registry_grpc
    assert "spillgate.v1.common_pb2" not in (out / "registry_pb2.pyi").read_text()
    assert gen_protos("--check", "--out", str(out)).returncode == 0


def test_decision_round_trips() -> None:
    decision = common_pb2.Decision(
        action=common_pb2.ACTION_OVERFLOW,
        reason="overflow_fit",
        detail="local queue 900 ms over budget; eu fits with 80 ms RTT",
        estimate=common_pb2.Estimate(
            network_ms=80.0,
            queue_ms=12.5,
            prefill_ms=40.0,
            decode_ms=600.0,
            total_ms=732.5,
            budget_ms=1500.0,
            cached_tokens=512,
        ),
        region="eu",
        endpoint="127.0.0.1:50051",
        model="llama-3.1-8b",
        version="v3",
        triton_model_name="llama_3_1_8b",
        ticket=common_pb2.Ticket(
            id="t-1",
            lease_expires_at=timestamp_pb2.Timestamp(seconds=1_700_000_000),
            lease_ms=30_000,
            region="eu",
            replica="eu-0",
        ),
    )

    parsed = common_pb2.Decision.FromString(decision.SerializeToString())

    assert parsed == decision
    assert parsed.estimate.total_ms == 732.5
    assert common_pb2.Action.Name(parsed.action) == "ACTION_OVERFLOW"
    assert not parsed.HasField("degrade")


def test_watch_event_round_trips() -> None:
    replica = registry_pb2.Replica(
        id="us-0",
        region="us",
        endpoint="127.0.0.1:8001",
        backend=common_pb2.BACKEND_KIND_SIMULATOR,
        loaded=[common_pb2.VersionRef(model="llama-3.1-8b", version="v3")],
        gpus=[0, 1],
        state=common_pb2.REPLICA_STATE_READY,
    )
    change_event = registry_pb2.WatchEvent(
        revision=7,
        changes=registry_pb2.ChangeSet(
            changes=[
                registry_pb2.Change(
                    kind=registry_pb2.CHANGE_KIND_PUT,
                    entity=registry_pb2.Entity(replica=replica),
                )
            ]
        ),
    )
    snapshot_event = registry_pb2.WatchEvent(
        revision=7,
        snapshot=registry_pb2.Snapshot(revision=7, replicas=[replica]),
    )

    for event, which in ((change_event, "changes"), (snapshot_event, "snapshot")):
        parsed = registry_pb2.WatchEvent.FromString(event.SerializeToString())
        assert parsed == event
        assert parsed.WhichOneof("event") == which

    change = change_event.changes.changes[0]
    assert change.entity.WhichOneof("entity") == "replica"
    assert not change.HasField("previous")
    put = registry_pb2.PutRequest(entity=change.entity)
    assert not put.HasField("expected_revision")
    put.expected_revision = 0
    assert put.HasField("expected_revision"), "revision 0 must be a valid CAS target"
