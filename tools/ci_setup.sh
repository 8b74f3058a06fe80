#!/usr/bin/env bash
# Installs the Debian packages two tests need besides the venv, and no more. Run by .ci/run before `make test`;
# under CI a missing one fails its test instead of skipping it.
# - chromium: tests/test_browser.py drives it through Playwright, which never downloads a browser of its own;
# - qemu-user: tests/test_bnb_cpu.py runs bitsandbytes under qemu-x86_64 as a CPU without AVX-512.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v qemu-x86_64 >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "ci_setup: $(chromium --version 2>/dev/null); $(qemu-x86_64 -version | head -1)"
