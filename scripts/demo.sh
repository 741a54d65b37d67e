#!/usr/bin/env bash
# Set up the environment (first run only) and run the demo: a small DDPM trained on the bundled
# images on CPU, watched by memwatch. Extra arguments go to `memwatch demo` (e.g. --control).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec memwatch demo "$@"
