"""`spillgate registry apply/get/watch/delete` against a real registry process, and spec parsing."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spillgate._proto import common_pb2
from spillgate.registry import spec
from spillgate.registry.cli import main
from tests.test_registry_service import Registry, start_registry

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "registry.toml"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = start_registry(tmp_path / "registry.db")
    yield reg
    assert reg.stop() == 0, "".join(reg.output)


def run(registry: Registry, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--registry", registry.address, *argv], out=out)
    return code, out.getvalue()


# --- spec parsing (pure) ------------------------------------------------------------------


def test_example_spec_parses_to_every_kind_in_dependency_order() -> None:
    entities = spec.parse_spec(EXAMPLE.read_text())
    kinds = [e.WhichOneof("entity") for e in entities]
    assert kinds == sorted(kinds, key=spec.KINDS.index)
    assert {"region", "model", "version", "alias", "placement"} <= set(kinds)
    large = next(e.model for e in entities if e.WhichOneof("entity") == "model")
    assert large.kind == common_pb2.MODEL_KIND_LLM
    alias = next(e.alias for e in entities if e.WhichOneof("entity") == "alias")
    assert [(t.model, t.weight) for t in alias.default_targets.targets] == [("llm-large", 100)]


def test_spec_round_trips_through_to_spec_dict() -> None:
    text = """
[[replica]]
id = "us-0"
region = "us"
endpoint = "127.0.0.1:8001"
backend = "triton-vllm"
state = "draining"
[[alias]]
name = "chat"
default_targets = [{ model = "m", version = "v1", weight = 100 }]
region_targets = { eu = [{ model = "m", version = "v2", weight = 100 }] }
"""
    entities = spec.parse_spec(text)
    replica = next(e for e in entities if e.WhichOneof("entity") == "replica")
    assert replica.replica.backend == common_pb2.BACKEND_KIND_TRITON_VLLM
    assert replica.replica.state == common_pb2.REPLICA_STATE_DRAINING
    body = spec.to_spec_dict(replica)
    assert body["backend"] == "triton-vllm" and body["state"] == "draining"
    alias = next(e for e in entities if e.WhichOneof("entity") == "alias")
    assert alias.alias.region_targets["eu"].targets[0].version == "v2"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[region]\nid='x'", "not valid TOML"),
        ("[[fleet]]\nx=1", "unknown table(s) fleet"),
        ("region = 3", "region: must be an array of tables"),
        ("[[model]]\nid='m'\nkind='giant'", "model[0].kind: unknown value 'giant' (one of: llm,"),
        ("[[model]]\nid='m'\nwat=1", "model[0]:"),
        ("[[region]]\nid='a'\n[[region]]\nid='b'\nrtt_ms='far'", "region[1]:"),
    ],
)
def test_bad_specs_name_the_table_and_field(text: str, message: str) -> None:
    with pytest.raises(spec.SpecError) as err:
        spec.parse_spec(text)
    assert message in str(err.value)


# --- commands against a real registry -----------------------------------------------------


def test_apply_shows_the_diff_then_applies_once_and_is_idempotent(registry: Registry) -> None:
    code, out = run(registry, "apply", "-f", str(EXAMPLE), "--dry-run")
    assert code == 0
    assert "+ region us" in out and "+ placement llm-large@v1/apac/default" in out
    assert "plan at revision 0: 12 to add, 0 to change, 0 to delete" in out
    assert "applied" not in out
    assert run(registry, "get", "regions")[1].startswith("no regions (revision 0)")

    code, out = run(registry, "apply", "-f", str(EXAMPLE))
    assert code == 0 and out.rstrip().endswith("applied: revision 1")

    code, out = run(registry, "apply", "-f", str(EXAMPLE))
    assert code == 0 and "0 to add, 0 to change, 0 to delete" in out and "nothing to do" in out


def test_apply_shows_field_changes_and_prunes_only_when_asked(
    registry: Registry, tmp_path: Path
) -> None:
    assert run(registry, "apply", "-f", str(EXAMPLE))[0] == 0
    text = EXAMPLE.read_text().replace("max_output_tokens = 1024", "max_output_tokens = 2048")
    # Drop the last placement (llm-small in us).
    text = text[: text.rindex("[[placement]]")]
    changed = tmp_path / "changed.toml"
    changed.write_text(text)

    code, out = run(registry, "apply", "-f", str(changed))
    assert code == 0
    assert "~ model llm-large\n    max_output_tokens: 1024 -> 2048" in out
    assert "- placement" not in out
    assert "0 to add, 1 to change, 0 to delete" in out

    code, out = run(registry, "apply", "-f", str(changed), "--prune")
    assert code == 0
    assert "- placement llm-small@v1/us/default" in out
    assert "0 to add, 0 to change, 1 to delete" in out
    code, out = run(registry, "get", "placements", "--region", "us")
    assert "llm-small" not in out and "llm-large" in out


def test_apply_refuses_invalid_specs_with_the_registrys_reason(
    registry: Registry, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[placement]]\nmodel = "ghost"\nversion = "v1"\nregion = "us"\npool = "p"\n')
    code, _ = run(registry, "apply", "-f", str(bad))
    assert code == 1
    assert run(registry, "get", "placements")[1].startswith("no placements (revision 0)")
    bad.write_text("[[model]]\nkind = 'llm'\nid = 7\n")
    assert run(registry, "apply", "-f", str(bad))[0] == 2
    assert run(registry, "apply", "-f", str(tmp_path / "missing.toml"))[0] == 2


def test_get_tables_json_and_not_found(registry: Registry, tmp_path: Path) -> None:
    assert run(registry, "apply", "-f", str(EXAMPLE))[0] == 0
    _, out = run(registry, "get", "regions")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "ZONE", "NAME", "RTT_MS", "GATEWAY", "ADMISSION", "STATE"]
    assert [line.split()[0] for line in lines[1:]] == ["apac", "eu", "us"]
    assert "eu=80.5" in lines[3]
    assert all(line.split()[-1] == "serving" for line in lines[1:])
    # An operator drains a region by applying it with `draining = true`.
    drained = tmp_path / "drained.toml"
    drained.write_text(
        EXAMPLE.read_text().replace('id = "apac"\n', 'id = "apac"\ndraining = true\n', 1)
    )
    assert run(registry, "apply", "-f", str(drained))[0] == 0
    _, out = run(registry, "get", "regions")
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["draining", "serving", "serving"]

    _, out = run(registry, "get", "version", "llm-large@v1", "-o", "json")
    body = json.loads(out)
    assert body["revision"] == 2 and body["items"][0]["triton_model_name"] == "llm-large"

    assert run(registry, "get", "model", "nope")[0] == 1
    assert run(registry, "get", "gizmos")[0] == 2


def test_delete_reports_found_and_refuses_dangling_references(registry: Registry) -> None:
    assert run(registry, "apply", "-f", str(EXAMPLE))[0] == 0
    # The alias and placements still reference the version.
    assert run(registry, "delete", "version", "llm-large@v1")[0] == 1
    code, out = run(registry, "delete", "placement", "llm-small@v1/us/default")
    assert code == 0 and out.startswith("deleted placement llm-small@v1/us/default: revision 2")
    code, out = run(registry, "delete", "placement", "llm-small@v1/us/default")
    assert code == 0 and "did not exist (revision 2)" in out
    assert run(registry, "delete", "region", "eu", "--expected-revision", "1")[0] == 1


def test_watch_prints_snapshot_then_changes_in_order(registry: Registry, tmp_path: Path) -> None:
    assert run(registry, "apply", "-f", str(EXAMPLE))[0] == 0
    assert run(registry, "delete", "placement", "llm-small@v1/us/default")[0] == 0
    # A real process, as a user runs it; it exits once it has seen revision 2.
    done = subprocess.run(
        [
            *(sys.executable, "-m", "spillgate.cli", "registry", "--registry", registry.address),
            *("watch", "--until-revision", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "rev 2" in lines[0] and "snapshot: 3 regions, 2 models" in lines[0]

    code, out = run(registry, "watch", "--from-revision", "1", "--until-revision", "2")
    assert code == 0
    assert [line.split(maxsplit=1)[1] for line in out.splitlines()] == [
        "rev 2      - placement llm-small@v1/us/default"
    ]


def test_unreachable_registry_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--registry", "127.0.0.1:1", "get", "regions"], out=io.StringIO())
    assert code == 1
    assert "UNAVAILABLE: cannot reach the registry at 127.0.0.1:1" in capsys.readouterr().err
