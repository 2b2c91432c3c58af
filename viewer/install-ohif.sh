#!/usr/bin/env bash
# Fetch OHIF's built viewer (the dist/ folder of the npm package @ohif/app) into viewer/ohif/.
# npm pack, not npm install: the package's own dependencies are build-time only (dist/ is
# self-contained) and some of them are not in every registry mirror. The tarball is checked
# against the integrity recorded in ohif.txt before it is unpacked.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck disable=SC1091
source ./ohif.txt
stamp=ohif/.installed-$OHIF_VERSION
[ -f "$stamp" ] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
tarball=$work/ohif-app-$OHIF_VERSION.tgz
actual=$(python3 -c 'import base64, hashlib, sys
print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")
if [ "$actual" != "$OHIF_INTEGRITY" ]; then
    echo "install-ohif: @ohif/app@$OHIF_VERSION integrity $actual, expected $OHIF_INTEGRITY" >&2
    exit 1
fi
tar -xzf "$tarball" -C "$work" package/dist
rm -rf ohif
mv "$work/package/dist" ohif
touch "$stamp"
echo "install-ohif: OHIF $OHIF_VERSION in viewer/ohif"
