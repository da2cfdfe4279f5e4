# leafwire — run `uv run just` to list recipes. Everything runs inside the project's uv environment.
set shell := ["bash", "-euo", "pipefail", "-c"]

# list recipes
default:
    @just --list

# build the models if missing, start hub + edge + every service, wait until healthy (Ctrl-C stops)
up: models
    uv run python -m deploy.stack up

# stop what `just up` started (from another terminal)
down:
    uv run python -m deploy.stack down

# state of each process of the local stack
status:
    uv run python -m deploy.stack status

# follow the logs of the local stack
logs:
    tail -n 20 -F .run/logs/*.log

# build SmolLM2-135M-Instruct (int4) and all-MiniLM-L6-v2 (ONNX) once, into ~/.cache/leafwire/models
models *args:
    uv run python deploy/models/build.py {{args}}

# who used what and what it cost (the usage report; --help for options)
usage *args:
    uv run leafwire usage {{args}}
# each cloud budget today and this month: every site's spending against its limit
budgets *args:
    uv run leafwire budgets {{args}}
# run the test suite: a worker per core (LW_TEST_WORKERS=0 for one process), each test file on one worker
test *args:
    uv run pytest -n "${LW_TEST_WORKERS:-auto}" --dist loadfile {{args}}

# ruff and mypy (strict)
lint:
    uv run ruff check .
    uv run mypy

# regenerate docs/asyncapi.json from the FastStream apps
asyncapi:
    uv run python -m shared.asyncapi docs/asyncapi.json

# regenerate the JSON Schema of every message into schemas/json
schemas:
    uv run python -m schemas.export schemas/json

# rebuild the tiny test fixture models (needs the model build environment from `just models`)
fixture-model:
    "${LW_HOME:-$HOME/.cache/leafwire}/build-venv/bin/python" tests/fixtures/make_tiny_model.py tests/fixtures/tiny-llama
    "${LW_HOME:-$HOME/.cache/leafwire}/build-venv/bin/python" tests/fixtures/make_tiny_embedder.py tests/fixtures/tiny-bert
