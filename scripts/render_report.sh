#!/usr/bin/env bash
# Render a report page in headless Chromium (Debian: apt-get install chromium) to a PNG:
#     bash scripts/render_report.sh [results/report.html] [docs/report.png]
set -euo pipefail
page=$(realpath "${1:-results/report.html}")
png=${2:-docs/report.png}
[[ -f $page ]] || { echo "no $page: run python experiments.py report first" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --window-size=1150,2400 \
    --screenshot="$png" "file://$page" 2>/dev/null
echo "wrote $png"
