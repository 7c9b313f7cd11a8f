#!/usr/bin/env bash
# Builds the Debian package (binaries, systemd units, default config and the
# maintainer scripts that create the user and state directory) with
# cargo-deb, then checks what is inside. Exits non-zero, naming each missing
# piece, when the package is not what an edge site needs.
#
#   packaging/build-deb.sh            # prints the path of the .deb last
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is missing: installing it"
    cargo install cargo-deb --locked
fi

# touchline-central is another crate's binary: build it for the assets.
cargo build --release --locked -p touchline-central
# cargo-deb builds the daemon itself, strips both binaries and puts their
# debug symbols in a separate touchline-dbgsym package.
out=$(cargo deb -p touchline --locked)
deb=$(grep -E '/touchline_[^/]*\.deb$' <<<"$out" | tail -n 1)
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    echo "build-deb: cargo deb did not report a .deb:" >&2
    echo "$out" >&2
    exit 1
fi
echo "built $deb"

fail=0
missing() {
    echo "build-deb: $*" >&2
    fail=1
}

contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
control=$(mktemp -d)
data=$(mktemp -d)
trap 'rm -rf "$control" "$data"' EXIT
dpkg-deb -e "$deb" "$control"
dpkg-deb -x "$deb" "$data"

# Files, with the modes that matter.
has() { grep -Eq "^$1 .* \./$2\$" <<<"$contents"; }
has '-rwxr-xr-x' usr/bin/touchline || missing "missing: /usr/bin/touchline (0755)"
has '-rwxr-xr-x' usr/bin/touchline-central || missing "missing: /usr/bin/touchline-central (0755)"
for unit in touchline.service touchline-central.service; do
    has '-rw-r--r--' "(usr/)?lib/systemd/system/$unit" || missing "missing: systemd unit $unit"
done
has '-rw-r-----' etc/touchline/site.toml || missing "missing: /etc/touchline/site.toml (0640, not world-readable)"
has '-rw-r--r--' etc/touchline/rules/cheer.toml || missing "missing: /etc/touchline/rules/cheer.toml"
has '-rw-r--r--' usr/share/doc/touchline/copyright || missing "missing: copyright file"
for bin in touchline touchline-central; do
    case $(file -b "$data/usr/bin/$bin" 2>/dev/null) in
    *"not stripped"* | "") missing "/usr/bin/$bin is not stripped" ;;
    *stripped*) ;;
    *) missing "/usr/bin/$bin: cannot tell whether it is stripped" ;;
    esac
done
# The units shipped are the ones in systemd/ (which the tests check).
for unit in touchline.service touchline-central.service; do
    for dir in usr/lib lib; do
        if [ -f "$data/$dir/systemd/system/$unit" ]; then
            cmp -s "$data/$dir/systemd/system/$unit" "systemd/$unit" ||
                missing "packaged $unit differs from systemd/$unit"
        fi
    done
done

# Conffiles: an operator's edits must survive upgrades.
for conf in /etc/touchline/site.toml /etc/touchline/rules/cheer.toml; do
    grep -qx "$conf" "$control/conffiles" 2>/dev/null || missing "not a conffile: $conf"
done
grep -q '^ Depends:.*adduser' <<<"$info" || missing "Depends lacks adduser (postinst runs it)"

# Maintainer scripts.
for script in postinst prerm postrm; do
    [ -x "$control/$script" ] || missing "missing maintainer script: $script"
    sh -n "$control/$script" 2>/dev/null || missing "$script is not valid sh"
    # cargo-deb replaces every occurrence of the token, comments included.
    [ "$(grep -c '#DEBHELPER#' "packaging/debian/$script")" -eq 1 ] ||
        missing "packaging/debian/$script must hold the debhelper token exactly once"
done
postinst=$(cat "$control/postinst" 2>/dev/null || true)
grep -q 'adduser --system --group' <<<"$postinst" || missing "postinst does not create the touchline user"
grep -q 'deb-systemd-helper enable touchline.service' <<<"$postinst" || missing "postinst does not enable touchline.service"
# The reference receiver stays disabled: its snippet may only re-enable it
# on upgrade when the operator had enabled it (debian-installed/was-enabled).
central_enable=$(awk '/# Automatically added by/ { block = "" } { block = block $0 "\n" }
    /# End automatically added section/ && block ~ /enable touchline-central.service/ { printf "%s", block }' <<<"$postinst")
if [ -n "$central_enable" ] && ! grep -q 'debian-installed touchline-central.service' <<<"$central_enable"; then
    missing "postinst enables touchline-central.service on install; it must stay disabled"
fi
# The user must exist before the unit is enabled (User=touchline).
user_line=$(grep -n 'adduser --system' <<<"$postinst" | head -n 1 | cut -d: -f1)
enable_line=$(grep -n 'deb-systemd-helper enable' <<<"$postinst" | head -n 1 | cut -d: -f1)
if [ -n "$user_line" ] && [ -n "$enable_line" ] && [ "$user_line" -gt "$enable_line" ]; then
    missing "postinst enables the unit before it creates the user"
fi
# Enabled, never started on install; an upgrade may only try-restart.
if grep -Eq 'deb-systemd-invoke +(start|restart|\$_dh_action)|_dh_action=start|systemctl( [^ ]+)* (start|restart) ' <<<"$postinst"; then
    missing "postinst starts the service; it must only enable it"
fi
grep -q 'deb-systemd-invoke stop touchline.service' "$control/prerm" 2>/dev/null ||
    missing "prerm does not stop touchline.service on removal"

# The default config must be valid where it is installed: check it with the
# packaged binary against the packaged rules (site.toml says rules/*.toml).
if [ -x "$data/usr/bin/touchline" ]; then
    if check=$("$data/usr/bin/touchline" check --config "$data/etc/touchline/site.toml" 2>&1); then
        echo "packaged site.toml: ${check#"$data"}"
    else
        missing "the packaged site.toml does not pass touchline check:"
        echo "$check" >&2
    fi
fi

if [ "$fail" -ne 0 ]; then
    echo "build-deb: $deb is incomplete (see above)" >&2
    exit 1
fi
echo "package checked: $(du -h "$deb" | cut -f1) $deb"
echo "$deb"
