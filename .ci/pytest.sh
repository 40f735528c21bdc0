#!/usr/bin/env bash
# Runs pytest in .venv. Exit code 5 means "no tests collected": an empty selection must fail, not pass.
set -uo pipefail
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
