# uffdrestore — build, test, lint, fuzz, bench, demo.
#
#   make build       bin/uffdrestore (+ the C client library and example target once csrc/ has them)
#   make test        vet, gofmt, go test -race, bounded fuzz of every Fuzz* target, benchmarks once
#   make lint        go vet, gofmt, staticcheck (when it can be fetched)
#   make fuzz        every Fuzz* target for FUZZTIME each (default 60s)
#   make bench       benchmarks, 5 runs each, then "uffdrestore bench" once it exists
#   make demo        build, then restore a generated snapshot lazily and print stats
#   make test-vm     the QEMU tests (qemu-system-x86, busybox-static, a guest kernel: see .ci/run)
#   make vm-demo     checkpoint a 512 MiB QEMU guest, restore it plainly and as lazy private clones
#   make readme-bench  re-run the benchmark commands README.md names and replace their tables
#   make hugepages   reserve at least HUGEPAGES default-size huge pages (root)
#
# Kernel tests skip with a reason when they lack root, huge pages or a kernel
# feature; UFFDRESTORE_STRICT=1 (set by .ci/run) turns those skips into failures.

SHELL     := /bin/bash
GO        ?= go
CFLAGS    ?= -O2 -Wall -Wextra -Werror -std=gnu11
CFLAGS    += -Icsrc
HUGEPAGES ?= 1024
FUZZTIME  ?= 60s
# The fuzz budget per target inside "make test".
TEST_FUZZTIME ?= 20s
# How long the fuzzer may spend minimizing each new interesting input (and a
# crasher). Go's default, 60s, is more than a bounded run's whole budget: with
# a fresh fuzz cache (CI, a new clone) a 20 s run spent most of it minimizing
# (executions in 20 s, default -> 1s: FuzzDecodeChunk 9,741 -> 170,539,
# FuzzRewrite 23 -> 157,902).
FUZZMINIMIZETIME ?= 1s
GOTEST_TIMEOUT ?= 25m

# Go's build cache keys a cgo package on the files in its own directory:
# restore/uffd's one-line shim.c includes csrc/ur_shim.c and csrc/ur_spawn.c,
# whose changes it would not see (an #error added to either built "fine" from
# the cache). Their hash in CGO_CFLAGS, which is part of the key, makes every
# make target rebuild them when they change.
SHIM_HASH := $(shell cat csrc/ur_shim.[ch] csrc/ur_spawn.[ch] 2>/dev/null | sha256sum | cut -c1-16)
export CGO_CFLAGS := $(or $(CGO_CFLAGS),-O2 -g) -DUR_SHIM_SOURCES=$(SHIM_HASH)

# The C client library and the example target exist only once their
# sources land in csrc/; until then "build" skips them.
CLIENT_SRC := $(wildcard csrc/ur_client.c)
TARGET_SRC := $(wildcard csrc/target.c)
C_HEADERS  := $(wildcard csrc/*.h)
PRELOAD_SRC := $(wildcard csrc/ur_preload.c)
C_OUTPUTS  := $(if $(CLIENT_SRC),bin/libuffdrestore.a bin/libuffdrestore.so) \
              $(if $(and $(CLIENT_SRC),$(PRELOAD_SRC)),bin/libuffdrestore-preload.so) \
              $(if $(and $(CLIENT_SRC),$(TARGET_SRC)),bin/uffdrestore-target)

# Directories (relative, no leading ./) holding Fuzz* targets, found fresh on
# every run so new targets are picked up.
FUZZ_FIND = grep -rlE --include='*_test.go' --exclude-dir=.git --exclude-dir=testdata '^func Fuzz[A-Za-z0-9_]*\(' .

.PHONY: all build bin/uffdrestore test vet fmt-check test-restart-1g test-vm vm-demo readme-bench lint fuzz bench demo demo-prebuilt hugepages clean

all: build

build: bin/uffdrestore $(C_OUTPUTS)

bin:
	mkdir -p bin

# go build decides itself what is stale, so this always asks it.
# urfave_cli_no_docs leaves out the CLI library's man-page and markdown
# generators (and the markdown parser they pull in, whose init alone took
# 1.3-2.4 ms): every start of the binary pays for its package inits, and a
# lazy restore's helper is this binary started again (exec p50 16.4 -> 14.9 ms).
bin/uffdrestore: | bin
	$(GO) build -tags urfave_cli_no_docs -o bin/uffdrestore .

bin/ur_client.o: $(CLIENT_SRC) $(C_HEADERS) | bin
	$(CC) $(CFLAGS) -fPIC -c -o $@ $(CLIENT_SRC)

bin/libuffdrestore.a: bin/ur_client.o
	rm -f $@
	$(AR) rcs $@ $^

bin/libuffdrestore.so: bin/ur_client.o
	$(CC) $(CFLAGS) -shared -o $@ $^ $(LDFLAGS)

# The preload library (uffdrestore run): the client code compiled in, only
# the intercepted libc calls exported.
bin/libuffdrestore-preload.so: $(PRELOAD_SRC) $(CLIENT_SRC) $(C_HEADERS) | bin
	$(CC) $(CFLAGS) -fPIC -shared -fvisibility=hidden -o $@ $(PRELOAD_SRC) $(LDFLAGS) -ldl -lpthread

bin/uffdrestore-target: $(TARGET_SRC) $(CLIENT_SRC) $(C_HEADERS) | bin
	$(CC) $(CFLAGS) -o $@ $(TARGET_SRC) $(CLIENT_SRC) $(LDFLAGS) -lpthread

vet:
	$(GO) vet ./...

fmt-check:
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt: these files need gofmt -w:"; echo "$$out"; exit 1; fi

# The race run goes through scripts/testsummary: plain go test output plus a
# closing "tests: N passed, N failed, N skipped" line (kept in
# bin/test-summary.txt for .ci/run to repeat at the end of its log).
test: vet fmt-check | bin
	set -o pipefail; $(GO) test -race -count=1 -timeout $(GOTEST_TIMEOUT) -json ./... 2>&1 | $(GO) run ./scripts/testsummary -o bin/test-summary.txt
	$(GO) test -count=1 -run 'NoAlloc|Allocations' ./...   # allocation counts, without the race detector
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(TEST_FUZZTIME)
	$(GO) test -run='^$$' -bench=. -benchtime=1x ./...

# The server-restart test of issue 15 at 1 GiB (make test runs it at 64 MiB):
# a server SIGKILLed under two targets, `load --adopt` takes them back.
test-restart-1g:
	UFFDRESTORE_RESTART_MIB=1024 $(GO) test -count=1 -timeout 20m -v -run 'TestLoadRestartAdopt' .

# The QEMU tests (issue 12): a real qemu-system-x86_64 under TCG boots a
# busybox guest the tests build, then vm checkpoint / vm restore / private
# clones run on it. They need root (userfaultfd), qemu-system-x86,
# busybox-static and a guest kernel (UFFDRESTORE_VM_KERNEL, default: the
# one .ci/run extracts under /var/cache/uffdrestore-vm); they skip with the
# reason when one is missing (a failure under UFFDRESTORE_STRICT=1). Built
# only with the vmtest tag, so `make test` does not run them. About 2 min.
test-vm: build
	$(GO) test -race -tags vmtest -count=1 -timeout 15m -run '^TestVM' -v .

# Boots a 512 MiB guest, checkpoints it, restores it from a copy of its RAM
# file (the baseline) and as VM_DEMO_CLONES lazy private clones from one
# server, verifies their memory; ends with one summary line.
VM_DEMO_CLONES ?= 2
vm-demo: build
	bin/uffdrestore vm demo --ram 512M --clones $(VM_DEMO_CLONES)

# Re-runs every `- command: uffdrestore bench ...` named in README.md and
# puts its --markdown output in place of the block (a quiet machine: several
# minutes); README_BENCH_ONLY=SUBSTRING runs only the matching ones.
readme-bench: build
	$(GO) run ./scripts/readmebench -readme README.md -bin bin/uffdrestore -only "$(README_BENCH_ONLY)"

lint: vet fmt-check
	@if $(GO) run honnef.co/go/tools/cmd/staticcheck@latest -version >/dev/null 2>&1; then \
		echo "staticcheck ./..."; \
		$(GO) run honnef.co/go/tools/cmd/staticcheck@latest ./...; \
	else \
		echo "lint: staticcheck could not be fetched or built here; skipped (go vet and gofmt passed)"; \
	fi

# Runs every Fuzz* target, one at a time (go test -fuzz takes one target of
# one package), for FUZZTIME each, minimizing new inputs for at most
# FUZZMINIMIZETIME so that the time goes to fuzzing. A crasher is written to the package's
# testdata/fuzz/FuzzX/: commit it with the fix.
fuzz:
	@set -e; n=0; \
	for f in $$($(FUZZ_FIND) | sort); do \
		dir=$$(dirname "$$f"); \
		for name in $$(sed -nE 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/p' "$$f"); do \
			echo "$(GO) test -run='^\$$' -fuzz='^$$name\$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=$(FUZZMINIMIZETIME) $$dir/"; \
			$(GO) test -run='^$$' -fuzz="^$$name\$$" -fuzztime=$(FUZZTIME) -fuzzminimizetime=$(FUZZMINIMIZETIME) "$$dir/"; \
			n=$$((n+1)); \
		done; \
	done; \
	if [ $$n -eq 0 ]; then echo "fuzz: no Fuzz* targets yet; nothing to fuzz"; else echo "fuzz: $$n targets fuzzed for $(FUZZTIME) each"; fi

# Benchmarks at real sizes: the Go benchmarks with UFFDRESTORE_BENCH_SIZE
# (CI runs them once at their small defaults from `make test`), then the
# side-by-side comparison of `uffdrestore bench` on a generated snapshot.
BENCH_SIZE  ?= 2GiB
BENCH_COUNT ?= 3
BENCH_GEN   ?= 1GiB
bench: build
	UFFDRESTORE_BENCH_SIZE=$(BENCH_SIZE) $(GO) test -run='^$$' -bench=. -benchmem -count=$(BENCH_COUNT) -timeout 60m ./...
	bin/uffdrestore bench --generate $(BENCH_GEN) --content realistic --pattern sparse:0.1,sequential --runs 5

# The demo generates a snapshot, restores it lazily in-process (checking every
# byte), then serves it to the C example target, a separate process. It
# builds first, unless this user may not write bin/ (a checkout that root
# built, run by another user): then it runs the binaries already there.
BIN_WRITABLE := $(shell { test -w bin || { test ! -e bin && test -w .; }; } && echo yes)
demo: $(if $(BIN_WRITABLE),build,demo-prebuilt)
	bin/uffdrestore demo --target bin/uffdrestore-target

demo-prebuilt:
	@if [ ! -x bin/uffdrestore ] || [ ! -x bin/uffdrestore-target ]; then \
		echo "demo: $$(id -un) may not write bin/ and it holds no build: run \`make build\` as the checkout's owner first"; exit 1; \
	fi
	@echo "demo: $$(id -un) may not write bin/: running the binaries built there"

# Reserves at least HUGEPAGES default-size huge pages; a bigger pool is left
# alone. The first reservation on a fresh VM is slow (the host faults the
# memory in): that is expected.
hugepages:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "hugepages: needs root. Run:"; \
		echo "  sudo sh -c 'echo $(HUGEPAGES) > /proc/sys/vm/nr_hugepages'"; \
		echo "or: sudo make hugepages HUGEPAGES=$(HUGEPAGES)"; \
		exit 1; \
	fi
	@have=$$(cat /proc/sys/vm/nr_hugepages); \
	if [ "$$have" -ge $(HUGEPAGES) ]; then \
		echo "hugepages: $$have huge pages already reserved (>= $(HUGEPAGES))"; \
		grep -E '^(HugePages_|Hugepagesize)' /proc/meminfo; exit 0; \
	fi; \
	echo "echo $(HUGEPAGES) > /proc/sys/vm/nr_hugepages"; \
	echo $(HUGEPAGES) > /proc/sys/vm/nr_hugepages; \
	got=$$(cat /proc/sys/vm/nr_hugepages); \
	if [ "$$got" -lt $(HUGEPAGES) ]; then \
		echo "hugepages: only $$got of $(HUGEPAGES) reserved; compacting memory and retrying"; \
		sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory; \
		echo $(HUGEPAGES) > /proc/sys/vm/nr_hugepages; \
		got=$$(cat /proc/sys/vm/nr_hugepages); \
	fi; \
	grep -E '^(HugePages_|Hugepagesize)' /proc/meminfo; \
	if [ "$$got" -lt $(HUGEPAGES) ]; then \
		echo "hugepages: only $$got of $(HUGEPAGES) huge pages could be reserved (too little free memory)"; exit 1; \
	fi

clean:
	rm -rf bin
