# The two quick-start commands: `make run` and `make test`. Each sets everything up first.
# `make run APP_ARGS="--port 8000"` passes options to the app.
.PHONY: setup setup-dev run test

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

run: setup
	.venv/bin/python -m app $(APP_ARGS)

test: setup-dev
	.venv/bin/python -m pytest
