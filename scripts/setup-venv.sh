#!/usr/bin/env bash
# Creates the Python environment (libtorch + reference packages) once per set of pinned versions and
# links it as ./.venv. The environment lives in a per-user cache keyed by the requirements' hash, so
# clean clones of the repository reuse it instead of downloading ~5 GB again.
set -euo pipefail
cd "$(dirname "$0")/.."
req=scripts/requirements.txt
key=$(sha256sum "$req" | cut -c1-16)
root=${FLOWBACK_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/flowback}
venv="$root/venv-$key"
mkdir -p "$root"
# Two clones setting up at once must not interleave pip runs in one environment.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "setup-venv: creating $venv (torch 2.11.0 and reference packages; several GB, once)"
  # Installed in place (venv scripts embed their path); the marker is written only when pip succeeded,
  # so an interrupted install is redone from scratch.
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  touch "$venv/.complete"
fi
# Build headers and test readers, added to the same environment (their own marker, so a change here
# does not download torch again).
extra_req=scripts/requirements-extra.txt
extra_key=$(sha256sum "$extra_req" | cut -c1-16)
if [ ! -f "$venv/.extra-$extra_key" ]; then
  echo "setup-venv: adding $extra_req"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$extra_req"
  touch "$venv/.extra-$extra_key"
fi
if [ "$(readlink .venv 2>/dev/null)" != "$venv" ]; then
  rm -rf .venv
  ln -s "$venv" .venv
fi
