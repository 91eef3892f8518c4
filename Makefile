# rnnserve: one entry point for people and CI. `make run` serves, `make test` proves it.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STORE ?= model_store
# Debian packages: gRPC C++ and protobuf for the native core, Java for TorchServe's frontend,
# redis-server and nginx for the scale-out tests, libb64 for Triton's perf_analyzer, openssl for the
# TLS tests' certificates.
DEBS := g++ cmake pkg-config libssl-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
  libhiredis-dev openjdk-17-jre-headless redis-server nginx-light libb64-0d openssl
# the build backend's own pins, read from pyproject.toml (one place to change them)
BUILD_REQUIRES := $(shell $(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
NATIVE_SOURCES := $(shell find serving/core/src protos -type f) serving/core/CMakeLists.txt
NATIVE_STAMP := $(VENV)/.native-built

.PHONY: setup debs native run test test-asan lint format protos train bench bench-crash bench-failover clean

setup: debs $(STAMP) $(NATIVE_STAMP)

# What the machine lacks, installed once (apt-get needs root, as on CI and in the Dockerfile).
debs:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, by its exact pin: pip takes the local CPU build for it (never a CUDA download)
	$(BIN)/pip install --quiet torch==2.13.0
	# the build backend into the venv, so the core builds in place and rebuilds incrementally
	$(BIN)/pip install --quiet $(BUILD_REQUIRES)
	$(BIN)/pip install --quiet --no-build-isolation -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP) $(NATIVE_STAMP)

# The native core again when its sources changed (CMake recompiles only what did).
$(NATIVE_STAMP): $(NATIVE_SOURCES)
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(NATIVE_STAMP)

native: $(NATIVE_STAMP)

run: setup
	$(BIN)/rnnserve up --store $(STORE)

# The whole suite, then the core's sanitizer build under the suites of its hot path.
test: setup lint
	$(BIN)/pytest
	$(MAKE) test-asan

# ASan + UBSan build of the core (its own build folder), loaded in place of the release build.
# Leak detection is off: CPython keeps its own allocations until exit by design. The tests that
# measure returned memory (RSS) are left out: ASan's allocator quarantines what is freed.
ASAN_TESTS := tests/integration/test_grpc_api.py tests/integration/test_grpc_packed.py \
  tests/integration/test_grpc_stepmany.py tests/integration/test_grpc_invariant.py \
  tests/integration/test_oip.py tests/integration/test_hardening.py tests/integration/test_core_gate.py \
  tests/integration/test_session_transfer.py tests/integration/test_oip_step_index.py \
  tests/integration/test_redis_store.py
test-asan: setup
	cmake -S serving/core -B build/asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRNNSERVE_SANITIZE=ON \
	  -Dpybind11_DIR=$$($(BIN)/python -c 'import pybind11; print(pybind11.get_cmake_dir())') \
	  -DPython_EXECUTABLE=$(CURDIR)/$(BIN)/python
	cmake --build build/asan -j2
	RNNSERVE_NATIVE_LIB="$$(ls $(CURDIR)/build/asan/_native*.so)" \
	  LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(BIN)/pytest -p no:cacheprovider $(ASAN_TESTS) -k "not returns_its_memory"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup
	$(BIN)/python -m serving.protogen

train: setup
	$(BIN)/rnnserve train --all --store $(STORE)

bench: setup
	$(BIN)/python -m bench.run

# 20 perf_analyzer stream runs each at 64, 256 and 1,000 sequences against the native core;
# counts server exits, hangs and errors into docs/benchmarks.md
bench-crash: setup
	$(BIN)/python -m bench.crash --runs 20

# kill -9 of a replica (Redis, three replicas, nginx) to each cut step's retried answer, p50/p99
bench-failover: setup
	$(BIN)/python -m bench.failover --kills 5

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
