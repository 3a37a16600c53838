# The two commands of the README. Both do all set-up on a fresh clone.
.PHONY: quickstart test test-fast reliability setup stop bench

setup:
	bash scripts/setup.sh

quickstart:
	bash scripts/quickstart.sh

stop:
	bash scripts/quickstart.sh stop

test:
	bash scripts/test.sh

test-fast:  # the developer loop: everything but the slow (end-to-end) cases
	bash scripts/test.sh -m "not slow"

reliability:  # every reliability case, the slow kill-and-resume ones included (make test runs a seeded sample)
	RETROFLOW_RELIABILITY=full bash scripts/test.sh tests/reliability

bench:
	bash scripts/bench.sh
