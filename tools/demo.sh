#!/usr/bin/env bash
# The project's main job on a fresh machine: set up (idempotent), then `fam demo` --
# the embedded demo model generates native, 2x, 3x, 4x and 2x4 images in modes
# fam / direct / direct_native and writes them with a labelled contact sheet.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
VENV="${FAM_VENV:-.venv}"
"$VENV/bin/fam" demo "$@"
