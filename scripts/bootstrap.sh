#!/usr/bin/env bash
# Install everything raftstate and its tests need on Debian 12 / Python 3.11.
# Idempotent: re-running it is cheap. apt packages are installed only when
# missing and only as root (CI and the dev boxes run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(etcd-server etcd-client nftables iproute2 conntrack)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: warning: ${missing[*]} missing and not root; etcd comparisons will be skipped" >&2
  fi
fi

# Debian's system Python refuses pip installs outside a venv (PEP 668); this
# project is meant to own its machine, so allow it there. Harmless elsewhere.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "bootstrap: ok ($(python3 --version), raftstate $(python3 -c 'import raftstate; print(raftstate.__version__)'))"
