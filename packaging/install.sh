#!/usr/bin/env bash
# Installs an unpacked l7mesh release: the binaries into $PREFIX/bin (default /usr/local), the
# systemd unit into $UNIT_DIR (default /etc/systemd/system), the settings into $ETC_DIR
# (default /etc/l7mesh; an existing config.yaml is kept), completions and man pages. DESTDIR
# puts it all under another root (for packagers). Then: `systemctl enable --now l7mesh`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-}
prefix=${PREFIX:-/usr/local}
unit_dir=${UNIT_DIR:-/etc/systemd/system}
etc_dir=${ETC_DIR:-/etc/l7mesh}
install -d "$dest$prefix/bin" "$dest$prefix/lib/l7mesh" "$dest$unit_dir" "$dest$etc_dir/policies"
install -m 0755 "$here"/bin/* "$dest$prefix/bin/"
install -m 0644 "$here/lib/l7mesh/redirector.bpf.o" "$dest$prefix/lib/l7mesh/"
sed -e "s|/usr/local/bin/l7ctl|$prefix/bin/l7ctl|" -e "s|/etc/l7mesh/config.yaml|$etc_dir/config.yaml|" \
  "$here/lib/systemd/system/l7mesh.service" >"$dest$unit_dir/l7mesh.service"
chmod 0644 "$dest$unit_dir/l7mesh.service"
if [ ! -e "$dest$etc_dir/config.yaml" ]; then
  sed "s|/etc/l7mesh/policies|$etc_dir/policies|" "$here/etc/l7mesh/config.yaml" >"$dest$etc_dir/config.yaml"
  chmod 0644 "$dest$etc_dir/config.yaml"
fi
if [ -d "$here/share" ]; then
  cp -r "$here/share" "$dest$prefix/"
fi
echo "l7mesh installed under ${dest:-/}: $prefix/bin/l7ctl, $unit_dir/l7mesh.service, $etc_dir/config.yaml"
if [ -z "$dest" ] && [ "$unit_dir" = /etc/systemd/system ] && [ "$(systemctl is-system-running 2>/dev/null || true)" != offline ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload
  echo "start it with: systemctl enable --now l7mesh"
fi
