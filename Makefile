# The two commands of the README: `make run` and `make test`. Both build the environment first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROMPT ?= The built-in function

.PHONY: install run test test-compose bench clean protos lint-protos

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch, before the project, so pip never pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The CPU attention kernel (kernels/ragged_cpu.py), compiled once here rather than by the first services the
	# tests start; without a compiler it only warns, and the services use the PyTorch reference.
	$(PY) -m zeroc_kernels.ragged_cpu || echo "the ragged CPU kernel was not built: the torch backend will be used"
	touch $(STAMP)

install: $(STAMP)

# One prefill and one decode service and the OpenAI-compatible gateway on localhost; prints the addresses and
# the zeroc and curl queries to try. Ctrl-C stops it.
run: install
	$(VENV)/bin/zeroc stack up --decode 1 --gateway --prompt "$(PROMPT)"

# The suite on TEST_WORKERS processes (pytest-xdist), a test file to a worker (its module fixtures start once), each
# process on one intra-op thread: a worker's OpenMP threads spinning between ops would take the cores from the
# other (two workers at the default threads took as long as one worker alone). The tests whose results must hold
# at several thread counts set them themselves, and the session's colocated decode service runs two engine threads.
# It prints its 15 slowest tests: the suite must stay under 20 minutes on a 2-core machine.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# compose.yaml built and run for real (tests/deploy/compose_e2e.py, which `make test` does not collect): a
# dockerd of its own builds the image and runs the stack on loopback, then everything is torn down, the daemon
# too. As root it installs what it runs from Debian's packages when they are missing.
COMPOSE_TOOLS := dockerd docker-compose debootstrap curl
test-compose: install
	@for tool in $(COMPOSE_TOOLS); do command -v $$tool > /dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        docker.io docker-compose debootstrap curl > /dev/null; \
	fi
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/deploy/compose_e2e.py

# Regenerate the committed Python stubs of protos/zeroc/v1 (a test fails when they are stale).
protos: install
	$(PY) tools/gen_protos.py

lint-protos: install
	cd protos && ../$(VENV)/bin/buf lint

bench: install
	$(VENV)/bin/zeroc bench forward

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
