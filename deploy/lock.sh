#!/usr/bin/env sh
# Regenerate the dependency locks that both images install (run from the repository root).
#
#   deploy/requirements-inference.lock  every runtime dependency plus the `inference` extra (CUDA torch, Ray)
#   deploy/requirements.lock            the runtime dependencies only, pinned to the SAME versions
#
# Both come from `uv pip compile` (the pip-tools resolver format) for CPython 3.11 on x86_64 manylinux,
# constrained to the versions the test virtualenv runs (its `pip freeze`; torch's local `+cpu` suffix
# is dropped so the inference image gets the CUDA build of the same version), so the images run what
# `make test` tested. The second lock is
# compiled with the first as constraints, so a package present in both has one version.
# `make install` installs with the inference lock as constraints, so the locks also pin what the tests
# run; UPGRADE=1 compiles without the test virtualenv's versions (`--upgrade`: the newest that
# pyproject.toml allows), and the next `make install` moves the virtualenv to them.
set -eu
VENV=${VENV:-.venv}
UV="$VENV/bin/uv"
[ -x "$UV" ] || "$VENV/bin/python" -m pip install -q 'uv>=0.9,<1'
mkdir -p build; tmp=build/test-venv-constraints.txt
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v ' @ ' | grep -vi '^sophia-backbone' | sed 's/+cpu$//' > "$tmp"
common="--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --annotation-style line"
if [ "${UPGRADE:-}" = 1 ]; then pinned="--upgrade"; else pinned="-c $tmp"; fi
"$UV" pip compile pyproject.toml --extra inference $common $pinned -o deploy/requirements-inference.lock
"$UV" pip compile pyproject.toml $common -c deploy/requirements-inference.lock -o deploy/requirements.lock
rm -f "$tmp"
