# The two-command quick start: `make demo` and `make test`.
SWIFT ?= swift
SWIFT_FLAGS ?= -Xswiftc -warnings-as-errors

.PHONY: demo test bench build clean deps

demo:
	$(SWIFT) run -c release coupon-demo

build:
	$(SWIFT) build $(SWIFT_FLAGS)

# Installs what the tests need when missing (Debian: libhiredis-dev, redis-server), then runs
# every test with warnings as errors. Tests that need Redis start their own throwaway server.
test: deps
	$(SWIFT) build --build-tests $(SWIFT_FLAGS)
	$(SWIFT) test --skip-build

deps:
	@bash scripts/install-deps.sh

# Release-mode benchmarks; the last line printed is one JSON object.
bench: deps
	cd Benchmarks && $(SWIFT) run -c release bench

clean:
	rm -rf .build Benchmarks/.build
