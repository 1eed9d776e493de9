# spillgate developer entry points. Every target creates/reuses .venv and installs what it
# needs, so `make up` and `make test` work on a fresh machine with Python 3.11 and make.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv up replica test lint typecheck buf-lint protos protos-check breaking pytest bench bench-replica bench-registry bench-policy bench-admission bench-gateway bench-envoy bench-controlplane sim bench-sim bench-sim-fidelity clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "spillgate needs Python 3.11, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

# The main job: the local multi-region fleet (registry, 4/2/1 simulator replicas in us/eu/apac,
# admissions, gateways) until Ctrl-C. ARGS="-f fleet.toml" runs another spec.
up: venv
	$(BIN)/spillgate up $(ARGS)

# One Triton-protocol replica simulator with the demo models.
replica: venv
	$(BIN)/spillgate replica $(ARGS)

# The whole test suite: lint, types, protobuf contract, generated code, tests.
test: venv lint typecheck buf-lint protos-check pytest

lint: venv
	$(BIN)/ruff check services tests bench scripts
	$(BIN)/ruff format --check services tests bench scripts

typecheck: venv
	$(BIN)/mypy

buf-lint: venv
	$(BIN)/buf lint

# Regenerate services/spillgate/_proto from protos/ (commit the result).
protos: venv
	$(BIN)/python scripts/gen_protos.py

# Fails when the committed generated code differs from what protos/ produces.
protos-check: venv
	$(BIN)/python scripts/gen_protos.py --check

# Wire-compatibility check against main (for contract changes once main has protos).
breaking: venv
	$(BIN)/buf breaking --against '.git#branch=main'

pytest: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# All benchmarks; ARGS goes to the one run by its own target.
bench: bench-replica bench-registry bench-policy bench-admission bench-gateway bench-envoy bench-controlplane

bench-replica: venv
	$(BIN)/python bench/replica_capacity.py $(ARGS)

# Registry writes/s, watch fan-out, snapshot size/latency and restart time (~1-2 min).
bench-registry: venv
	$(BIN)/python bench/registry_bench.py $(ARGS)

# In-process Policy.decide latency p50/p99, 3 regions x 64 replicas (~5 s).
bench-policy: venv
	$(BIN)/python bench/policy_decide.py $(ARGS)

# Admit RPC p50/p99 and decisions/s against a real admission process (3 regions x 64
# replicas, static signals) next to a bare grpc.aio echo server, same client (~30 s).
bench-admission: venv
	$(BIN)/python bench/admission_rpc.py $(ARGS)

# Streamed chat through the gateway (gRPC Chat, HTTP SSE, Triton passthrough) next to the
# same request straight to the replica, alternating rounds, concurrency 1 and 16 (~2-4 min).
bench-gateway: venv
	$(BIN)/python bench/gateway_overhead.py $(ARGS)

# Gateway Health and streamed Chat straight to the gateway and through the ingress Envoy
# (configured by the control plane over ADS), alternating rounds, concurrency 1 and 16 (~1 min).
bench-envoy: venv
	$(BIN)/python bench/envoy_overhead.py $(ARGS)

# Control plane push -> Envoy ACK / applied for 1,000 and 10,000 endpoints, build_snapshot
# time and snapshot size (~30 s).
bench-controlplane: venv
	$(BIN)/python bench/controlplane_push.py $(ARGS)

# Global simulator: every scenario preset through spillgate and the six baselines at 2 %
# scale, 20 simulated s each (windows compressed), table + results.json + PNG plots in docs/sim/
# (~4 min on one core; the README numbers).
# ARGS overrides, e.g. ARGS="--scenario steady --scale 0.02 --duration 20".
sim: venv
	$(BIN)/spillgate sim --scenario all --policy all --scale 0.02 --duration 20 --markdown --out docs/sim $(ARGS)

# Simulator speed: simulated requests per wall second at full scale (steady, 10 s, ~10 min).
bench-sim: venv
	$(BIN)/python bench/sim_speed.py $(ARGS)

# Simulator vs real replica processes behind the admission service (p50/p99 TTFT, e2e).
bench-sim-fidelity: venv
	$(BIN)/python bench/sim_fidelity.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
