#!/usr/bin/env bash
# A headless-browser screenshot of the MLflow UI's runs list, as a person first sees it:
# the check behind README's "What to look at in the UI".
#
#   scripts/ui_screenshot.sh [BACKEND_STORE_URI] [OUT.png] [EXPERIMENT]
#   (defaults: sqlite:///mlflow.db, mlflow-ui.png, skin-lesion)
#
# Needs chromium (Debian: apt-get install chromium). Starts `mlflow ui` on a free port,
# waits for it, opens the experiment and saves the page once the UI has rendered.
set -euo pipefail
store=${1:-sqlite:///mlflow.db}
out=${2:-mlflow-ui.png}
experiment=${3:-skin-lesion}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "error: no chromium found (apt-get install chromium)" >&2
    exit 2
fi
id=$(MLFLOW_TRACKING_URI=$store python -c "
import sys, mlflow
found = mlflow.get_experiment_by_name(sys.argv[1])
sys.exit(f'error: no experiment {sys.argv[1]!r} in $store') if found is None else print(found.experiment_id)
" "$experiment")
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 120); do
    curl -sf --noproxy '*' "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.5
done
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1920,1000 \
    --virtual-time-budget=20000 --screenshot="$out" \
    "http://127.0.0.1:$port/#/experiments/$id/runs?workflowType=machine_learning" 2>/dev/null
echo "wrote $out (experiment $experiment, id $id)"
