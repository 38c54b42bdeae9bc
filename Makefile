# Shortcuts; the README's two set-up commands need none of these.
.PHONY: bench bench-quick test

bench:  ## every speed figure against its baseline, on this machine (about an hour on 2 cores)
	bash scripts/setup.sh && .venv/bin/pipeline bench

bench-quick:  ## the same code on tiny sizes (about a minute)
	bash scripts/setup.sh && .venv/bin/pipeline bench --quick

test:
	bash scripts/test.sh
