#!/usr/bin/env bash
# One setup for both README commands: create or reuse .venv, install qsmnode with its test
# extra, and install the Debian tools the tests and the demo use when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed

# Debian package -> a program it provides.
declare -A TOOLS=([dcmtk]=storescu [dicom3tools]=dciodvfy [dcm2niix]=dcm2niix [orthanc]=Orthanc)

missing=()
for pkg in "${!TOOLS[@]}"; do
    command -v "${TOOLS[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
# The OHIF end-to-end test (tests/test_viewer_ohif.py): headless Chromium, Orthanc's DICOMweb
# plugin, and npm for the viewer/ folder (installed at the end of this script).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# GNU time: the QSM benchmarks read each child's own peak memory from it
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then apt_cmd=(apt-get)
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then apt_cmd=(sudo apt-get)
    else apt_cmd=()
    fi
    if [ ${#apt_cmd[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian packages: ${missing[*]}"
        "${apt_cmd[@]}" update -qq
        DEBIAN_FRONTEND=noninteractive "${apt_cmd[@]}" install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
        echo "setup: (tests that need them will fail and name the missing program)" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "setup: installing qsmnode into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # --no-compile: Python compiles each module on its first import instead (once, into
    # __pycache__); byte-compiling every installed file up front took 84 s of a 33 s install
    "$VENV/bin/python" -m pip install -q --no-compile -e ".[test]"
    touch "$STAMP"
fi

# viewer/: puppeteer-core (npm ci, from the lock file) and OHIF's built viewer (install-ohif.sh).
if command -v npm >/dev/null 2>&1; then
    if [ ! -f viewer/node_modules/.package-lock.json ] \
        || [ viewer/package-lock.json -nt viewer/node_modules/.package-lock.json ]; then
        echo "setup: installing viewer/ (npm ci)"
        (cd viewer && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    fi
    viewer/install-ohif.sh
else
    echo "setup: npm missing: the OHIF viewer test will fail and say so" >&2
fi
