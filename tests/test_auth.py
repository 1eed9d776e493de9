"""API keys (SQLite store), the authenticator, its error mapping and `spillgate keys`."""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from spillgate.cli import main as spillgate_main
from spillgate.core.decision import Priority
from spillgate.core.ratelimit import TokenBuckets
from spillgate.gateway.auth import (
    TOKEN_BURST_S,
    Authenticator,
    AuthError,
    Caller,
    KeyStore,
    PermissionDenied,
    RateLimited,
    Scope,
    TenantLimits,
    clamp_priority,
    http_error,
    key_from_authorization,
    key_from_metadata,
    parse_key,
    rpc_error,
)
from spillgate.gateway.keys_cli import main as keys_main
from spillgate.gateway.sqlite_keys import SQLiteKeyStore


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SQLiteKeyStore]:
    with SQLiteKeyStore(tmp_path / "keys.db", clock=clock) as s:
        yield s


# --- key store ------------------------------------------------------------------------------


def test_created_key_looks_up_to_its_caller(store: SQLiteKeyStore) -> None:
    issued = store.create(
        "acme",
        priority_ceiling=Priority.NORMAL,
        scopes=["chat"],
        limits=TenantLimits(5, 10, 1000),
    )
    assert issued.key.startswith(f"sg_{issued.record.key_id}_")
    caller = store.lookup(issued.key)
    assert caller == Caller(
        "acme",
        issued.record.key_id,
        Priority.NORMAL,
        frozenset({"chat"}),
        TenantLimits(5, 10, 1000),
    )
    assert caller == issued.record.caller


def test_defaults_are_high_ceiling_chat_and_models_20_per_s(store: SQLiteKeyStore) -> None:
    caller = store.lookup(store.create("acme").key)
    assert caller is not None
    assert caller.priority_ceiling is Priority.HIGH
    assert caller.scopes == {"chat", "models"}
    assert caller.limits == TenantLimits(20, 40, None)


def test_keys_are_unique_and_independent(store: SQLiteKeyStore) -> None:
    a, b = store.create("acme"), store.create("acme")
    assert a.key != b.key and a.record.key_id != b.record.key_id
    store.revoke(a.record.key_id)
    assert store.lookup(a.key) is None
    assert store.lookup(b.key) is not None


def test_wrong_secret_with_a_real_key_id_fails(store: SQLiteKeyStore) -> None:
    issued = store.create("acme")
    key_id = issued.record.key_id
    secret = issued.key.removeprefix(f"sg_{key_id}_")
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert store.lookup(f"sg_{key_id}_{flipped}") is None
    assert store.lookup(f"sg_{key_id}_{secret[:-1]}") is None
    other = store.create("other").key
    other_secret = other.split("_", 2)[2]
    assert store.lookup(f"sg_{key_id}_{other_secret}") is None  # secret of another key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "sg_",
        "sg__",
        "Bearer sg_0123456789abcdef_" + "a" * 43,
        "sk-0123456789abcdef" + "a" * 43,
        "sg_0123456789abcde_" + "a" * 43,  # key id one digit short
        "sg_0123456789ABCDEF_" + "a" * 43,  # upper-case hex
        "sg_0123456789abcdef_" + "a" * 5,  # secret too short
        "sg_0123456789abcdef_" + "a" * 43 + "=",  # not URL-safe base64
        "sg_0123456789abcdef_" + "a" * 43 + "\n",
        "sg_0123456789abcdef_" + "a" * 5000,
        "sg_0123456789abcdef_" + "é" * 43,
    ],
)
def test_malformed_keys_fail(store: SQLiteKeyStore, key: str) -> None:
    store.create("acme")
    assert store.lookup(key) is None


def test_parse_key_allows_underscores_in_the_secret() -> None:
    secret = "ab_cd-" * 8
    assert parse_key(f"sg_0123456789abcdef_{secret}") == ("0123456789abcdef", secret)


def test_revoked_key_fails_and_stays_listed(store: SQLiteKeyStore, clock: Clock) -> None:
    issued = store.create("acme")
    clock.now += 60
    assert store.revoke(issued.record.key_id) is True
    clock.now += 60
    assert store.revoke(issued.record.key_id) is True  # idempotent, first time kept
    assert store.lookup(issued.key) is None
    (record,) = store.list()
    assert record.revoked and record.revoked_at == clock.now - 60
    assert store.revoke("0123456789abcdef") is False


def test_only_the_secret_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with SQLiteKeyStore(path) as store:
        issued = store.create("acme")
        assert store.lookup(issued.key) is not None
    secret = issued.key.split("_", 2)[2]
    files = [p for p in tmp_path.iterdir() if p.name.startswith("keys.db")]
    data = b"".join(p.read_bytes() for p in files)
    assert issued.record.key_id.encode() in data  # sanity: we are reading the right files
    assert secret.encode() not in data
    assert issued.key.encode() not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_survive_reopening_the_store(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "keys.db"
    with SQLiteKeyStore(path, clock=clock) as store:
        kept = store.create("acme", scopes=["chat", "admin"], limits=TenantLimits(1, 2))
        gone = store.create("acme")
        store.revoke(gone.record.key_id)
    with SQLiteKeyStore(path, clock=clock) as store:
        assert store.lookup(kept.key) == kept.record.caller
        assert store.lookup(gone.key) is None
        assert [r.key_id for r in store.list()] == [kept.record.key_id, gone.record.key_id]


def test_revocation_by_another_connection_applies_at_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with SQLiteKeyStore(path) as gateway, SQLiteKeyStore(path) as cli:
        issued = cli.create("acme")
        assert gateway.lookup(issued.key) is not None
        cli.revoke(issued.record.key_id)
        assert gateway.lookup(issued.key) is None


def test_last_used_is_recorded_coarsely(store: SQLiteKeyStore, clock: Clock) -> None:
    issued = store.create("acme")
    assert store.list()[0].last_used is None
    store.lookup(issued.key)
    first = clock.now
    clock.now += 30
    store.lookup(issued.key)
    assert store.list()[0].last_used == first
    clock.now += 31
    store.lookup(issued.key)
    assert store.list()[0].last_used == clock.now


@pytest.mark.parametrize("tenant", ["", " acme", "a b", "-x", "x" * 129, "acme\n"])
def test_bad_tenants_are_refused(store: SQLiteKeyStore, tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        store.create(tenant)


def test_unknown_scopes_are_refused(store: SQLiteKeyStore) -> None:
    with pytest.raises(ValueError, match="unknown scope 'root'"):
        store.create("acme", scopes=["chat", "root"])


def test_sqlite_store_is_a_key_store(store: SQLiteKeyStore) -> None:
    keys: KeyStore = store
    assert keys.list() == ()


# --- priority -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "ceiling", "expected"),
    [
        (Priority.CRITICAL, Priority.HIGH, Priority.HIGH),
        (Priority.HIGH, Priority.HIGH, Priority.HIGH),
        (Priority.BATCH, Priority.HIGH, Priority.BATCH),
        (Priority.NORMAL, Priority.LOW, Priority.LOW),
        (Priority.CRITICAL, Priority.CRITICAL, Priority.CRITICAL),
    ],
)
def test_requested_priority_is_clamped_to_the_ceiling(
    requested: Priority, ceiling: Priority, expected: Priority
) -> None:
    assert clamp_priority(requested, ceiling) is expected


# --- credentials ----------------------------------------------------------------------------

KEY = "sg_0123456789abcdef_" + "s" * 43


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("Bearer", None),
        ("Bearer   ", None),
        (f"Bearer {KEY}", KEY),
        (f"bearer {KEY}", KEY),
        (f"BEARER  {KEY} ", KEY),
        (f"Basic {KEY}", ""),
        (KEY, ""),  # no scheme: present but unusable
    ],
)
def test_authorization_header_parsing(value: str | None, expected: str | None) -> None:
    assert key_from_authorization(value) == expected


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([], None),
        ([("user-agent", "grpc-python")], None),
        ([("authorization", f"Bearer {KEY}")], KEY),
        ([("Authorization", f"Bearer {KEY}")], KEY),  # HTTP header pairs keep their case
        ([("x-api-key", KEY)], KEY),
        ([("x-api-key", f" {KEY} ".encode())], KEY),
        ([("x-api-key", "")], None),
        ([("authorization", f"Bearer {KEY}"), ("x-api-key", "other")], KEY),
        ([("x-api-key", "other"), ("authorization", f"Bearer {KEY}")], KEY),
        ([("authorization", "Bearer"), ("x-api-key", KEY)], KEY),
        ([("authorization", f"Bearer {KEY}"), ("authorization", "Bearer second")], KEY),
    ],
)
def test_metadata_parsing(metadata: list[tuple[str, str | bytes]], expected: str | None) -> None:
    assert key_from_metadata(metadata) == expected


@pytest.fixture
def auth(store: SQLiteKeyStore) -> Authenticator:
    return Authenticator(store, TokenBuckets())


def test_authenticate_accepts_every_convention(auth: Authenticator) -> None:
    key = auth.keys.create("acme").key
    for credentials in (
        f"Bearer {key}",
        [("authorization", f"Bearer {key}")],
        [("x-api-key", key)],
        {"authorization": f"Bearer {key}"},  # a mapping, e.g. starlette's request.headers
        {"x-api-key": key}.items(),
    ):
        assert auth.authenticate(credentials).tenant == "acme"


@pytest.mark.parametrize("credentials", [None, "", [], [("x-api-key", " ")], "Bearer "])
def test_missing_key(auth: Authenticator, credentials: str | None) -> None:
    with pytest.raises(AuthError, match=r"^missing API key$"):
        auth.authenticate(credentials)


def test_invalid_key_never_echoes_it(auth: Authenticator) -> None:
    real = auth.keys.create("acme")
    auth.keys.revoke(real.record.key_id)
    for key in (real.key, KEY, "hunter2", f"sg_{real.record.key_id}_guess-guess-guess-guess"):
        for credentials in (f"Bearer {key}", [("x-api-key", key)], f"Basic {key}"):
            with pytest.raises(AuthError) as info:
                auth.authenticate(credentials)
            assert str(info.value) == "invalid API key"
            error = rpc_error(info.value)
            assert error.code is grpc.StatusCode.UNAUTHENTICATED
            assert key not in error.message
            assert http_error(info.value) == (
                401,
                {"WWW-Authenticate": 'Bearer realm="spillgate"'},
                "invalid API key",
            )


def test_scopes_are_enforced(auth: Authenticator) -> None:
    caller = auth.authenticate(f"Bearer {auth.keys.create('acme').key}")
    auth.require_scope(caller, Scope.CHAT)
    with pytest.raises(PermissionDenied) as info:
        auth.require_scope(caller, Scope.ADMIN)
    assert rpc_error(info.value).code is grpc.StatusCode.PERMISSION_DENIED
    assert http_error(info.value)[0] == 403


# --- rate limits ----------------------------------------------------------------------------


def _caller(tenant: str, limits: TenantLimits) -> Caller:
    return Caller(tenant, "0123456789abcdef", limits=limits)


def test_check_rate_limits_per_tenant_with_retry_info(tmp_path: Path) -> None:
    auth = Authenticator(SQLiteKeyStore(tmp_path / "keys.db"), TokenBuckets())
    try:
        acme = _caller("acme", TenantLimits(requests_per_s=2, burst=3))
        for _ in range(3):
            auth.check_rate(acme, 10.0)
        with pytest.raises(RateLimited) as info:
            auth.check_rate(acme, 10.0)
        assert info.value.retry_after_ms == 500
        auth.check_rate(_caller("other", TenantLimits(2, 3)), 10.0)  # own bucket
        auth.check_rate(acme, 10.5)

        error = rpc_error(info.value)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        ((_name, blob),) = error.trailing_metadata()
        status = status_pb2.Status.FromString(blob)
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == 500
        assert http_error(info.value) == (429, {"Retry-After": "1"}, str(info.value))
    finally:
        auth.keys.close()


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert http_error(RateLimited(1))[1] == {"Retry-After": "1"}
    assert http_error(RateLimited(1000))[1] == {"Retry-After": "1"}
    assert http_error(RateLimited(1001))[1] == {"Retry-After": "2"}


def test_token_limit_is_charged_when_set(tmp_path: Path) -> None:
    auth = Authenticator(SQLiteKeyStore(tmp_path / "keys.db"), TokenBuckets())
    try:
        caller = _caller("acme", TenantLimits(1000, 1000, tokens_per_s=100))
        burst = 100 * TOKEN_BURST_S
        auth.check_rate(caller, 0.0, tokens=int(burst) - 50)
        with pytest.raises(RateLimited) as info:
            auth.check_rate(caller, 0.0, tokens=100)
        assert info.value.what == "tokens"
        assert info.value.retry_after_ms == 500
        auth.check_rate(caller, 100.0, tokens=10**9)  # bigger than the bucket: waits for full
        with pytest.raises(RateLimited):
            auth.check_rate(caller, 100.0, tokens=1)
        no_token_limit = _caller("free", TenantLimits(1000, 1000))
        auth.check_rate(no_token_limit, 0.0, tokens=10**9)
    finally:
        auth.keys.close()


# --- CLI ------------------------------------------------------------------------------------


def _keys(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = keys_main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_create_list_revoke(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    code, out, err = _keys(
        "create", "--store", db, "--tenant", "acme", "--priority-ceiling", "normal",
        "--scopes", "chat,admin", "--rps", "5", "--burst", "10", "--tokens-per-s", "2000",
    )  # fmt: skip
    assert code == 0, err
    key = out.strip()
    assert out.count("\n") == 1 and key.startswith("sg_")
    assert "cannot be shown again" in err and key not in err
    with SQLiteKeyStore(db) as store:
        caller = store.lookup(key)
    assert caller is not None
    assert caller.priority_ceiling is Priority.NORMAL
    assert caller.scopes == {"chat", "admin"}
    assert caller.limits == TenantLimits(5, 10, 2000)

    code, out, _ = _keys("list", "--store", db)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["KEY_ID", "TENANT", "CEILING", "SCOPES", "RATE", "CREATED", "REVOKED"]
    assert row.split()[:4] == [caller.key_id, "acme", "normal", "admin,chat"]
    assert "5/s burst 10, 2000 tok/s" in row and row.endswith("-")
    assert key not in out and key.split("_", 2)[2] not in out

    assert _keys("revoke", "--store", db, caller.key_id) == (0, f"revoked {caller.key_id}\n", "")
    code, out, _ = _keys("list", "--store", db)
    assert not out.splitlines()[1].endswith("-")
    with SQLiteKeyStore(db) as store:
        assert store.lookup(key) is None


def test_cli_errors(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.db")
    code, _, err = _keys("list", "--store", db)
    assert code == 1 and "no key store" in err
    assert not Path(db).exists()
    assert _keys("create", "--store", db, "--tenant", "acme")[0] == 0
    code, _, err = _keys("revoke", "--store", db, "0123456789abcdef")
    assert code == 1 and "no key" in err
    code, _, err = _keys("create", "--store", db, "--tenant", "bad tenant")
    assert code == 2 and "tenant" in err
    code, _, err = _keys("create", "--store", db, "--tenant", "acme", "--rps", "0")
    assert code == 2 and "rate_per_s" in err
    for bad in (["--scopes", "root"], ["--priority-ceiling", "urgent"]):
        with pytest.raises(SystemExit) as exit_info:
            _keys("create", "--store", db, "--tenant", "acme", *bad)
        assert exit_info.value.code == 2


def test_spillgate_keys_is_wired_into_the_main_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "keys.db")
    assert spillgate_main(["keys", "create", "--store", db, "--tenant", "acme"]) == 0
    key = capsys.readouterr().out.strip()
    assert spillgate_main(["keys", "list", "--store", db]) == 0
    assert key.split("_")[1] in capsys.readouterr().out
