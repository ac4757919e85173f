# The few commands a newcomer needs. `make up` and `make test` set up .venv first.
.PHONY: setup up test test-fast lint structure proto bench clean

STAMP := .venv/.installed

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

up: $(STAMP)            ## run the whole E-P-D deployment on the tiny model
	.venv/bin/epd up

test: $(STAMP)          ## every test (unit, integration, e2e)
	.venv/bin/pytest

test-fast: $(STAMP)     ## unit tests only
	.venv/bin/pytest tests/unit

lint: $(STAMP)
	.venv/bin/ruff check epd services tests benchmarks

structure: $(STAMP)     ## no import cycles (grimp), the gateway core without aiohttp, files <= 400 lines
	.venv/bin/pytest -q tests/unit/test_structure.py

proto: $(STAMP)         ## regenerate epd/wire/gen from proto/
	.venv/bin/python -m grpc_tools.protoc -Iproto --python_out=epd/wire/gen --pyi_out=epd/wire/gen proto/epd.proto proto/admin.proto

clean:
	rm -rf .venv *.egg-info .pytest_cache
