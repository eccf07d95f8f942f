#!/usr/bin/env bash
# Installs the Debian packages the build needs (cmake and nasm build the vendored libjpeg-turbo with
# its SIMD code; libgloo-dev has the headers of c10d's Gloo backend), only when one is missing.
set -euo pipefail
missing=()
for tool in cmake nasm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# Gloo's headers: libtorch ships the Gloo process group but not the headers torch-ext compiles against.
[ -f /usr/include/gloo/allreduce.h ] || missing+=(libgloo-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "setup-system: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
