#!/usr/bin/env bash
# What `make test` needs beyond Go and make, in one place: `make deps`
# (which `make test` runs first) and .ci/run install it from here.
#
#   mosquitto-clients  the broker's acceptance tests run the real mosquitto_sub
#                      and mosquitto_pub against our broker
#   chromium           the dashboard is tested in headless Chromium (chromedp)
#   gcc, libc6-dev     the unit tests run under the race detector, which needs cgo
#   python3-*          the device hub is tested with the official Azure IoT
#                      Python SDK (../shared/thirdparty/azure-iot-sdk-python)
#                      on Debian's python3 and these packages (its SOURCE.md)
#
# On Debian (or Ubuntu) what is missing is installed with apt-get, as root
# or through sudo. Elsewhere, or without either, the script says what is
# missing and exits 1; APPLIANCE_SKIP_DEPS=1 skips it (the tests that need a
# missing tool then skip themselves, or fail under CI=true).
# Docker Engine is not installed here: the docker tests use it when it
# answers (and fail under CI=true when it does not).
set -euo pipefail

if [ "${APPLIANCE_SKIP_DEPS:-}" = 1 ]; then
  exit 0
fi

python_pkgs=(python3 python3-paho-mqtt python3-requests python3-requests-unixsocket python3-janus
  python3-socks python3-deprecation python3-typing-extensions)

need=()
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if command -v dpkg >/dev/null 2>&1; then
  for p in "${python_pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
elif ! python3 -c 'import paho.mqtt, requests, requests_unixsocket, janus, socks, deprecation, typing_extensions' >/dev/null 2>&1; then
  need+=("${python_pkgs[@]}")
fi

if [ ${#need[@]} -eq 0 ]; then
  echo "test dependencies: all present"
  exit 0
fi

echo "test dependencies missing: ${need[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "make test: install them with your system's package manager (Debian: apt-get install -y ${need[*]}), or run with APPLIANCE_SKIP_DEPS=1 to skip the tests that need them" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "make test: run as root, or install them first: apt-get install -y ${need[*]} (or APPLIANCE_SKIP_DEPS=1 to skip the tests that need them)" >&2
    exit 1
  fi
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q "${need[@]}"
