#!/usr/bin/env bash
# Install everything raftstate and its tests need on Debian 12 / Python 3.11.
# Idempotent: re-running it is cheap. apt packages are installed only when
# missing and only as root (CI and the dev boxes run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

# coturn is the NAT lab's STUN/TURN server (cluster/natlab.py starts its own
# turnserver inside a namespace); the system service must never run. ping
# measures the WAN lab's delays (tests/test_wanlab.py, docs/wanlab.md), iperf3
# its rate limits and packet rate (`raftstate lab probe`; its daemon stays off,
# debconf's default under noninteractive).
# nodejs/npm: buf (the proto linter, shipped as an npm package) and the grpc-js
# client test (tests/node/, tests/test_node_client.py).
APT_PACKAGES=(etcd-server etcd-client nftables iproute2 conntrack coturn iputils-ping iperf3)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Node.js and npm by command, not by package: a machine may have them from
# another source (NodeSource's nodejs bundles npm and conflicts with Debian's
# npm package); Debian's own are installed only where the commands are missing.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    systemd_up=false
    [ -d /run/systemd/system ] && systemd_up=true
    new_coturn=false
    [[ " ${missing[*]} " == *" coturn "* ]] && new_coturn=true
    # On systemd, coturn's postinst enables and starts coturn.service (a
    # turnserver on 0.0.0.0:3478). A runtime mask makes that start fail; the
    # unit is then disabled. Without systemd, /etc/init.d/coturn starts nothing
    # unless TURNSERVER_ENABLED=1 in /etc/default/coturn, which ships commented.
    if $new_coturn && $systemd_up; then
      systemctl mask --runtime --quiet coturn.service
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if $new_coturn && $systemd_up; then
      systemctl unmask --runtime --quiet coturn.service
      systemctl disable --now --quiet coturn.service
    fi
  else
    echo "bootstrap: warning: ${missing[*]} missing and not root; etcd comparisons and NAT-lab tests will be skipped" >&2
  fi
fi

# Debian's system Python refuses pip installs outside a venv (PEP 668); this
# project is meant to own its machine, so allow it there. Harmless elsewhere.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# Node tools, pinned by tests/node/package-lock.json: buf (`buf lint` of
# proto/ in scripts/test.sh) and @grpc/grpc-js + @grpc/proto-loader for the
# Node client test. Reinstalled only when the lockfile changed.
if command -v npm >/dev/null; then
  if [ ! -f tests/node/node_modules/.package-lock.json ] \
     || [ tests/node/package-lock.json -nt tests/node/node_modules/.package-lock.json ]; then
    npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
  fi
else
  echo "bootstrap: warning: npm missing; buf lint fails and the Node client test is skipped" >&2
fi

echo "bootstrap: ok ($(python3 --version), raftstate $(python3 -c 'import raftstate; print(raftstate.__version__)'))"
