# The two commands of the README. Both do all set-up on a fresh clone.
.PHONY: quickstart test setup stop bench

setup:
	bash scripts/setup.sh

quickstart:
	bash scripts/quickstart.sh

stop:
	bash scripts/quickstart.sh stop

test:
	bash scripts/test.sh

bench:
	bash scripts/bench.sh
