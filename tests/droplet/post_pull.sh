#!/usr/bin/env bash
# Stand-in for IntelliWatt's deploy/droplet/post_pull.sh, run after every `git pull` of the web app on the
# droplet. Written from its behaviour, not copied. What it does here:
#   - runs apply_droplet_services.sh (above);
#   - then for smt-webhook.service, smt-ingest.service, smt-upload-server.service and the other droplet
#     units, "restart if it exists": a regular file of that name in a unit directory, or the name in
#     `sudo systemctl list-unit-files` (which lists masked units) -> `sudo systemctl restart <unit>`,
#     with no `|| true`, under `set -e`. A masked unit's restart fails (exit 1), which ends the script there:
#     the later restarts and the health checks do not run. docs/operator.md "Migrating" says so and what to do.
set -euo pipefail
R="${SYSTEMCTL_STANDIN_ROOT:?}"
here="$(cd "$(dirname "$0")" && pwd)"

sudo bash "$here/apply_services.sh"

restart_if_exists() {
  local u="$1" d
  for d in etc/systemd/system lib/systemd/system usr/lib/systemd/system; do
    if [[ -f "$R/$d/$u" ]]; then
      echo "[post_pull] restarting $u"
      sudo systemctl restart "$u"
      return 0
    fi
  done
  if sudo systemctl list-unit-files --no-pager 2>/dev/null | awk '{print $1}' | grep -x "$u" >/dev/null; then
    echo "[post_pull] restarting $u"
    sudo systemctl restart "$u"
  else
    echo "[post_pull] skipping $u (not installed)"
  fi
}

for unit in smt-webhook.service smt-ingest.service smt-upload-server.service green-button-upload-server.service \
            efl-pdftotext.service intelliwatt-ensure-services.timer efl-fetch-proxy.service nginx.service; do
  restart_if_exists "$unit"
done
echo "[post_pull] done"
