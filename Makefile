# smsgw: `make run` starts the daemon on the local services; `make test` runs every test.
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: run test fmt lint check services

## run: the daemon against the local RabbitMQ and PostgreSQL, log provider (nothing is sent)
run: services
	$(CARGO) run --quiet -- run

## test: every test, against the real RabbitMQ and PostgreSQL
test: services
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --no-fail-fast
else
	$(CARGO) test --no-fail-fast
endif

## fmt: format the code
fmt:
	$(CARGO) fmt

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## check: what CI runs
check: lint test

## services: start RabbitMQ and PostgreSQL if they are down
services:
	@scripts/services.sh
