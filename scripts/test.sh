#!/usr/bin/env bash
# Run the test suite in the project's own environment (created on first use).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m pytest "$@"
