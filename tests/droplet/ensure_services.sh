#!/usr/bin/env bash
# Stand-in for IntelliWatt's deploy/droplet/intelliwatt-ensure-services.sh, which its
# intelliwatt-ensure-services.timer runs every 2 minutes (OnUnitActiveSec=120) as the deploy user.
# Written from its behaviour, not copied; paths are under the test's temp root ($SYSTEMCTL_STANDIN_ROOT).
# What it does, unit by unit, for nginx, efl-pdftotext, smt-upload-server, green-button-upload-server,
# smt-webhook, smt-ingest.timer and smt-ingest.service:
#   - "installed" means a regular file of that name in /etc/systemd/system, /lib/systemd/system or
#     /usr/lib/systemd/system, or the name in the first column of `sudo systemctl list-unit-files`
#     (which lists masked units too: a mask does not make a unit "not installed");
#   - an installed unit whose `systemctl is-enabled` is not "enabled" gets `sudo systemctl enable`, and one
#     whose `systemctl is-active` is not "active" gets `sudo systemctl start`; both failures are ignored.
set -euo pipefail
R="${SYSTEMCTL_STANDIN_ROOT:?}"

installed() {
  local u="$1" d
  for d in etc/systemd/system lib/systemd/system usr/lib/systemd/system; do
    [[ -f "$R/$d/$u" ]] && return 0
  done
  sudo systemctl list-unit-files --no-pager 2>/dev/null | awk '{print $1}' | grep -x "$u" >/dev/null
}

keep_up() {
  local u="$1" state
  installed "$u" || return 0
  state="$(systemctl is-enabled "$u" 2>/dev/null || true)"
  if [[ "$state" != enabled ]]; then
    echo "[ensure] enabling $u (was: $state)"
    sudo systemctl enable "$u" >/dev/null 2>&1 || true
  fi
  state="$(systemctl is-active "$u" 2>/dev/null || true)"
  if [[ "$state" != active ]]; then
    echo "[ensure] starting $u (was: $state)"
    sudo systemctl start "$u" >/dev/null 2>&1 || true
  fi
}

for unit in nginx.service efl-pdftotext.service smt-upload-server.service green-button-upload-server.service \
            smt-webhook.service smt-ingest.timer smt-ingest.service; do
  keep_up "$unit"
done
echo "[ensure] done"
