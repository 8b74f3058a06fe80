#!/usr/bin/env bash
# Installs what tests/test_browser.py needs besides the venv's playwright package (the `test` extra): Debian's
# Chromium. Playwright drives that executable; it never downloads a browser of its own. Run by .ci/run before
# `make test`; under CI a missing browser fails the test instead of skipping it.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "ci_browser_setup: $(chromium --version 2>/dev/null) already installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
echo "ci_browser_setup: installed $(chromium --version 2>/dev/null)"
