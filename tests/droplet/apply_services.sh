#!/usr/bin/env bash
# Stand-in for IntelliWatt's deploy/droplet/apply_droplet_services.sh, which post_pull.sh runs (as root) on
# every deploy of the web app. Written from its behaviour, not copied; paths are under $SYSTEMCTL_STANDIN_ROOT
# and the repository is $R/home/deploy/apps/intelliwatt. What it does:
#   - `cp` each of its unit files (smt-upload-server.service, smt-webhook.service, the watchdog's .service and
#     .timer, …) to /etc/systemd/system/<name>. cp follows a destination symlink, so over a mask
#     (-> /dev/null) it writes into /dev/null and the mask stays. It then greps the copy for old repository
#     paths and seds them (a copy read through /dev/null has none, so the mask link is not replaced);
#   - `cp` its drop-in to /etc/systemd/system/smt-webhook.service.d/override.conf (that one name only);
#   - daemon-reload, then `enable --now` the watchdog timer, smt-upload-server.service and
#     smt-webhook.service, each `|| true`: a masked unit's refusal does not stop it.
set -euo pipefail
R="${SYSTEMCTL_STANDIN_ROOT:?}"
repo="$R/home/deploy/apps/intelliwatt"
dst_dir="$R/etc/systemd/system"

for src in deploy/droplet/smt-upload-server.service deploy/droplet/smt-webhook.service \
           deploy/droplet/intelliwatt-ensure-services.service deploy/droplet/intelliwatt-ensure-services.timer; do
  [[ -f "$repo/$src" ]] || continue
  dst="$dst_dir/$(basename "$src")"
  echo "[apply] installing $dst"
  sudo cp "$repo/$src" "$dst"
  if sudo grep -q "/home/deploy/apps/intelliwatt-clean" "$dst" 2>/dev/null; then
    sudo sed -i "s|/home/deploy/apps/intelliwatt-clean|/home/deploy/apps/intelliwatt|g" "$dst"
  fi
done

sudo mkdir -p "$dst_dir/smt-webhook.service.d"
sudo cp "$repo/deploy/droplet/systemd/smt-webhook.override.conf" "$dst_dir/smt-webhook.service.d/override.conf"

sudo systemctl daemon-reload
sudo systemctl enable --now intelliwatt-ensure-services.timer || true
sudo systemctl enable --now smt-upload-server.service || true
sudo systemctl enable --now smt-webhook.service || true
echo "[apply] done"
