# The two quick-start commands: `make run` and `make test`. Each sets everything up first.
.PHONY: setup setup-dev run test

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

run: setup
	.venv/bin/python -m app

test: setup-dev
	.venv/bin/python -m pytest
