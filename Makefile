# modelguard: `make serve` and `make test` do all set-up themselves on a fresh clone.
PYTHON    ?= python3.11
VENV      ?= .venv
BIN       := $(VENV)/bin
PY        := $(BIN)/python
STAMP     := $(VENV)/.installed
ARTIFACTS ?= artifacts
PORT      ?= 50051
HOST      ?= 127.0.0.1
# `make monitor` listens here; `make serve MONITOR=HOST:PORT` connects to such a monitor.
# TLS on that link: `make monitor ARGS="--tls-cert C --tls-key K"`, `make serve MONITOR_CA=CA.pem`
MONITOR_LISTEN ?= 127.0.0.1:7070
MONITOR   ?=
MONITOR_CA ?=
ARGS      ?=
# Data directory (torchvision layout: FashionMNIST/raw, MNIST/raw): $MODELGUARD_DATA when set,
# else ./data (the code's default; the tests also look in ../shared/data).
export MODELGUARD_ARTIFACTS := $(ARTIFACTS)
export PYTHONPATH := $(CURDIR)

STUBS := protos/inference_pb2.py protos/inference_pb2_grpc.py protos/inference_pb2.pyi
OIP_STUBS := protos/grpc_predict_v2_pb2.py protos/grpc_predict_v2_pb2_grpc.py \
             protos/grpc_predict_v2_pb2.pyi
TARGET_CKPT := $(ARTIFACTS)/target.pt
POOL_STAMP := $(ARTIFACTS)/pool/.complete

.PHONY: help venv protos train models dp serve monitor test attack attacks bench eval chaos clean distclean \
        triton-venv

help:
	@echo "make serve    set up everything and serve on $(HOST):$(PORT) (PORT=..., ARGS=..., KEYS=...)"
	@echo "make monitor  run the monitor on its own on $(MONITOR_LISTEN) (MONITOR_LISTEN=...); then"
	@echo "              make serve MONITOR=$(MONITOR_LISTEN) connects to it (docs/monitor.md)"
	@echo "make test     set up and run the test suite"
	@echo "make train    train the target model (if missing)"
	@echo "make models   train the defences' model pool (if missing)"
	@echo "make dp       DP-SGD targets (eps $(DP_EPSILONS), if missing) + their table (results/dp; long)"
	@echo "make attack   run the original copycat attack against a running server"
	@echo "make bench    wire-speed benchmark + monitor calibration + attack table + defence table (long)"
	@echo "make eval     end-to-end evaluation against a live server (long)"
	@echo "make chaos    kill -9, full disk, SIGTERM, key churn, fuzzing against real servers (~10 min)"
	@echo "make triton-venv  $(TRITON_VENV): tritonclient[grpc] in its own venv (docs/ecosystem.md)"
	@echo "make clean    remove generated stubs and caches; distclean also venv, artifacts, results"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP)

$(STUBS) &: protos/inference.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/inference.proto

# The Open Inference Protocol v2 service (package "inference", served beside modelguard.v1).
$(OIP_STUBS) &: protos/grpc_predict_v2.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/grpc_predict_v2.proto

protos: $(STUBS) $(OIP_STUBS)

# tritonclient 2.x needs protobuf < 7 and the project pins protobuf 7, so NVIDIA's client lives
# in its own venv (tests/test_oip.py runs it as a subprocess; docs/ecosystem.md).
TRITON_VENV ?= .venv-triton
TRITONCLIENT ?= tritonclient[grpc]==2.73.0
$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --disable-pip-version-check -q "$(TRITONCLIENT)" numpy
	touch $@

triton-venv: $(TRITON_VENV)/.installed

$(TARGET_CKPT): | $(STAMP)
	$(PY) -m service train --out $@

train: $(TARGET_CKPT)

$(POOL_STAMP): $(TARGET_CKPT) | $(STAMP)
	$(PY) -m service.defences train-pool --artifacts $(ARTIFACTS)
	touch $@

models: $(POOL_STAMP)

# Differential privacy on the parameters (docs/dp.md): the target MLP trained with DP-SGD, one
# checkpoint per budget (serve one: make serve ARGS="--dp 3"; pool name "dp_eps3").
DP_EPSILONS ?= 8 3 1
$(ARTIFACTS)/dp/eps%.pt: | $(STAMP)
	$(PY) -m service train --dp-epsilon $* --out $@

dp: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(foreach e,$(DP_EPSILONS),$(ARTIFACTS)/dp/eps$(e).pt)
	$(PY) -m lab.dp --epsilons $(DP_EPSILONS) $(ARGS)

# The server's secret (keyed noise, routing, watermark, open mode's client ids): 32 random bytes
# as hex, generated once into $(ARTIFACTS) (git-ignored; keep it: a new secret changes every
# watermark and every open-mode client id). MODELGUARD_SECRET, when set, is used instead.
SECRET_FILE ?= $(ARTIFACTS)/secret
# How clients are identified (docs/security.md): open mode (any key, ids are keyed hashes) so
# that the README's attacks can pick their own keys; KEYS="--api-keys keys.toml" restricts.
KEYS ?= --open-keys
$(SECRET_FILE):
	@mkdir -p $(dir $@)
	@(umask 077 && $(PYTHON) -c "import secrets; print(secrets.token_hex(32))" > $@.tmp) && mv $@.tmp $@
	@echo "generated a random server secret in $@"

serve: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(POOL_STAMP) $(SECRET_FILE)
	$(PY) -m service serve --host $(HOST) --port $(PORT) $(if $(MODELGUARD_SECRET),,--secret-file $(SECRET_FILE)) $(if $(MONITOR),--monitor-address $(MONITOR)) $(if $(MONITOR_CA),--monitor-tls-ca $(MONITOR_CA)) $(KEYS) $(ARGS)

monitor: $(STUBS) $(SECRET_FILE)
	$(PY) -m monitor serve --listen $(MONITOR_LISTEN) $(if $(MODELGUARD_SECRET),,--secret-file $(SECRET_FILE)) $(ARGS)

test: $(STUBS) $(OIP_STUBS)
	$(PY) -m pytest -q $(ARGS)

attack: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT)
	$(PY) -m client copycat --address $(HOST):$(PORT) --budget 5000 --json results/copycat.json $(ARGS)

bench: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(POOL_STAMP)
	$(PY) -m lab.serving
	$(PY) -m lab.contention --out results/bench/contention.json
	$(PY) -m lab.monitor_bench
	$(PY) -m lab.bench_attacks
	$(PY) -m lab.defences

# Crashes, a full disk (a tmpfs: needs root) and hostile clients (lab/chaos.py; results/chaos)
chaos: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(POOL_STAMP)
	$(PY) -m lab.chaos $(ARGS)

eval: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(POOL_STAMP)
	$(PY) -m lab.campaign --out results/campaign $(ARGS)

clean:
	rm -f $(STUBS) $(OIP_STUBS)
	find . -name __pycache__ -prune -exec rm -rf {} + ; rm -rf .pytest_cache .hypothesis

distclean: clean
	rm -rf $(VENV) $(TRITON_VENV) $(ARTIFACTS) results *.egg-info

# --- scale-out (docs/scaleout.md): PostgreSQL + replicas + nginx on localhost -----------------
CLUSTER_DIR ?= $(ARTIFACTS)/cluster
CLUSTER_PORT ?= 50050
REPLICAS ?= 3
.PHONY: pg cluster cluster-stop cluster-status

pg: $(STAMP)
	$(PY) -m deploy.pgserver install

cluster: $(STUBS) $(OIP_STUBS) $(TARGET_CKPT) $(POOL_STAMP)
	$(PY) -m deploy.cluster up --dir $(CLUSTER_DIR) --port $(CLUSTER_PORT) --replicas $(REPLICAS) -- $(ARGS)

cluster-stop: $(STAMP)
	$(PY) -m deploy.cluster down --dir $(CLUSTER_DIR)

cluster-status: $(STAMP)
	$(PY) -m deploy.cluster status --dir $(CLUSTER_DIR)
