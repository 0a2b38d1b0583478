#!/usr/bin/env bash
# Installs verl's reference algorithms (verl.trainer.ppo.core_algos) for tests/test_verl_parity.py, beside the
# project venv and never into it: verl 0.9.1 pins transformers < 5.11 and the project needs 5.23, so verl goes in
# with --no-deps into a side directory ($VENV/verl_ref) that only the parity test's subprocess puts on PYTHONPATH.
# The side directory holds exactly what `import verl.trainer.ppo.core_algos` needs beyond the project venv:
#   verl itself; ray (verl/__init__ imports verl.protocol, which imports ray at module level) and the ray imports
#   the venv lacks (msgpack, jsonschema -> referencing, rpds-py, jsonschema-specifications); tensordict (also
#   imported by verl.protocol) and its pyvers and orjson; codetiming (imported by verl.utils).
# Everything else it imports (torch, numpy, omegaconf, packaging, pyyaml, click, filelock, protobuf, requests,
# attrs, cloudpickle) comes from the project venv. Idempotent: a stamp of the pins skips a second run.
# Usage: bash .ci/verl_ref.sh [VENV]   (default .venv; VERL_REF_DIR overrides the side directory)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VENV:-.venv}}"
DEST="${VERL_REF_DIR:-$VENV/verl_ref}"
PINS=(verl==0.9.1 ray==2.58.0 tensordict==0.10.0 codetiming==1.4.0 pyvers==0.2.3 orjson==3.13.0 msgpack==1.2.4
      jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)
STAMP="$DEST/.pins"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ]; then
  echo "verl_ref: $DEST up to date (${PINS[0]})"
  exit 0
fi
start=$SECONDS
rm -rf "$DEST"
"$VENV/bin/python" -m pip install -q --no-deps --no-compile --target "$DEST" "${PINS[@]}"
# Fail here, with the import error, rather than in the test, if the venv lacks something core_algos imports.
PYTHONPATH="$DEST" OMP_NUM_THREADS=1 "$VENV/bin/python" -c "import verl.trainer.ppo.core_algos"
echo "${PINS[*]}" > "$STAMP"
echo "verl_ref: installed ${PINS[*]} into $DEST in $((SECONDS - start)) s"
