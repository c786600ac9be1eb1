# smsgw: `make run` starts the daemon on the local services; `make test` runs every test.
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)
REPORT := target/tmp/fault-report.md
# Test binaries that restart or stop services, or run several daemons flat out: run
# alone, after the rest, one test at a time.
EXCLUSIVE := exclusive cluster
EXCLUSIVE_FILTER := $(subst $(eval) , | ,$(foreach t,$(EXCLUSIVE),binary($(t))))

.PHONY: run test test-parallel test-faults test-image-context bench fmt lint check audit fuzz release prerequisites services clean-test-envs

## run: the daemon against the local RabbitMQ and PostgreSQL, inbox provider (nothing is
## sent; every text is shown at http://127.0.0.1:9464/inbox). First, what it needs
## (scripts/prerequisites.sh: Rust, the services and their logins, saying what to do)
run:
	@scripts/prerequisites.sh run
	$(CARGO) run --quiet -- run

## test: the image's build context, then every test against the real RabbitMQ and
## PostgreSQL: the parallel suite, then the service-restarting faults alone; prints the
## fault report at the end
test:
	@scripts/prerequisites.sh test
	@scripts/services.sh
	@scripts/clean-test-envs.sh
	@rm -f $(REPORT)
	@status=0; \
	$(MAKE) --no-print-directory test-image-context || status=1; \
	$(MAKE) --no-print-directory test-parallel || status=1; \
	$(MAKE) --no-print-directory test-faults || status=1; \
	if [ -f $(REPORT) ]; then \
		echo; echo "Fault report"; \
		echo "| scenario | jobs | faults | lost | duplicates | time |"; \
		echo "|---|---|---|---|---|---|"; cat $(REPORT); \
	fi; \
	exit $$status

test-parallel:
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --no-fail-fast -E 'not ($(EXCLUSIVE_FILTER))'
else
	$(CARGO) test --no-fail-fast --lib --bins $(foreach t,$(filter-out $(EXCLUSIVE),$(basename $(notdir $(wildcard tests/*.rs)))),--test $(t))
endif

## test-faults: only the tests that restart RabbitMQ or stop PostgreSQL, and the cluster
## and shared-rate tests (one at a time)
test-faults: services
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --no-fail-fast --test-threads 1 -E '$(EXCLUSIVE_FILTER)'
else
	$(CARGO) test --no-fail-fast $(foreach t,$(EXCLUSIVE),--test $(t)) -- --test-threads 1
endif
	@scripts/services.sh

## test-image-context: build smsgw from exactly what the Dockerfile's build stage copies,
## as CI cannot build the image itself (no container engine; scripts/check-image-context.sh)
test-image-context:
	CARGO="$(CARGO)" scripts/check-image-context.sh

## bench: throughput, latency, memory and CPU against the raw ceilings of RabbitMQ and
## PostgreSQL on this machine, then the fairness, pacing and two-process scenarios
## (BENCH_JOBS, BENCH_LATENCIES, BENCH_SCENARIOS, BENCH_RECIPIENTS; see benches/throughput.rs)
bench: services clean-test-envs
	$(CARGO) bench --bench throughput

## release: a stripped release binary for this machine's target and its SHA-256 checksum,
## target/release-artifacts/smsgw-<version>-<target triple> and .sha256 (scripts/release.sh)
release:
	CARGO="$(CARGO)" scripts/release.sh

## prerequisites: what `make run` needs, and what to install, start or change when not
prerequisites:
	@scripts/prerequisites.sh run

## fmt: format the code
fmt:
	$(CARGO) fmt

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## check: lint, every test, and the RustSec advisory scan (CI runs lint and test: its
## machine cannot reach the advisory database)
check: lint test audit

## audit: RustSec advisories with cargo-deny (`cargo install cargo-deny`; it fetches the
## advisory database from GitHub, so it needs network access)
audit:
	@$(CARGO) deny --version >/dev/null 2>&1 || { echo "audit: cargo-deny is not installed (cargo install cargo-deny)"; exit 1; }
	$(CARGO) deny check advisories

## fuzz: a long run of the property tests on every input parser
fuzz:
	PROPTEST_CASES=200000 $(CARGO) test --release --test fuzz

## services: start RabbitMQ and PostgreSQL if they are down
services:
	@scripts/services.sh

## clean-test-envs: remove vhosts and databases left by killed test runs
clean-test-envs:
	@scripts/clean-test-envs.sh
