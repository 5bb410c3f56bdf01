#!/usr/bin/env bash
# Builds the Debian package of kvmagent: the binary, the systemd unit, the default configuration
# in /etc/kvmagent/ (a conffile), a `kvmagent` system group (postinst), the dependencies
# declared, the monitoring files and the README as documentation.
#
# Usage: systemd/build-deb.sh [BINARY] [OUTDIR]
#   BINARY default target/release/kvmagent (build it first: cargo build --release -p kvmagent)
#   OUTDIR default target/debian; prints the path of the .deb it wrote.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
bin=${1:-$top/target/release/kvmagent}
out=${2:-$top/target/debian}
[ -x "$bin" ] || { echo "build-deb.sh: $bin is not an executable; build it first" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/agent/Cargo.toml" | head -1)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"
# Stripped: the symbols are not shipped.
install -D -s -m 755 "$bin" "$stage/usr/bin/kvmagent"
install -D -m 644 "$here/kvmagent.service" "$stage/lib/systemd/system/kvmagent.service"
install -D -m 640 "$here/kvmagent.toml" "$stage/etc/kvmagent/kvmagent.toml"
install -D -m 644 "$top/README.md" "$stage/usr/share/doc/kvmagent/README.md"
install -D -m 644 "$top/agent/monitoring/grafana-dashboard.json" "$stage/usr/share/doc/kvmagent/grafana-dashboard.json"
install -D -m 644 "$top/agent/monitoring/alerts.yml" "$stage/usr/share/doc/kvmagent/alerts.yml"
mkdir -p "$stage/DEBIAN"
sed "s/@VERSION@/$version/" "$here/debian/control.in" > "$stage/DEBIAN/control"
echo "Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)" >> "$stage/DEBIAN/control"
install -m 644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"
install -m 755 "$here/debian/postinst" "$here/debian/postrm" "$stage/DEBIAN/"

mkdir -p "$out"
deb="$out/kvmagent_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "$deb"
