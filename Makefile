# One-command set-up for a fresh machine: `make demo` (main job) and `make test` (test suite).
# torch==2.13.0 is installed first so that nothing pulls a CUDA build of torch. The dev venv uses
# transformer-lens 3.9 (HookedTransformer and TransformerBridge); `make test` then also runs the
# TransformerBridge tests under transformer-lens 4.x in a second venv (scripts/test_tl4.sh).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.apd_lens_installed
# `make test` runs these a second time with apd_lens imported through jaxtyping's import hook + beartype
# (tests/conftest.py), so an untrue annotation fails: APD and SPD against brute force, saving and loading,
# CI functions, HookedTransformers, the LM evaluation (token-shaped masks).
TYPECHECKED_TESTS := tests/test_core_bruteforce.py tests/test_spd_bruteforce.py tests/test_io.py \
	tests/test_spd_ci_functions.py tests/test_adapters_hooked_transformer.py::test_exact_split_matches_logits \
	tests/test_lm_eval.py::test_evaluation_matches_loops_over_sequences \
	tests/test_lm_eval.py::test_adversarial_kl_follows_the_sign_of_finite_differences

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet "transformer-lens>=3.9,<4" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/tms.py --setting 5-2 --seed 0 --out runs/demo

test: $(STAMP)
	@# the browser test (tests/test_browse_browser.py) needs Debian's Chromium: install it when root, else it skips
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } || true
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q
	APD_LENS_TYPECHECK=1 $(BIN)/python -m pytest $(TYPECHECKED_TESTS) -q
	bash scripts/test_tl4.sh

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/step_benchmark.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
