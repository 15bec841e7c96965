#!/bin/sh
# Install spot-supervisor as a systemd service. Idempotent: run it again to upgrade.
#
#   sudo systemd/install.sh [--python PATH] [--source DIR | --package SPEC] [--root DIR] ...
#
# What it does, under --root (default /):
#   /opt/spot-supervisor/venv                  a venv of an explicit Python >= 3.10, with
#                                              spot-supervisor pip-installed into it
#   /opt/spot-supervisor/README.md             the docs the unit's Documentation= names
#   /etc/systemd/system/spot-supervisor.service   always replaced (site changes: drop-ins)
#   /etc/spot-supervisor/config.toml           the example, only when no config is there
#   multi-user.target.wants/spot-supervisor.service   the unit is enabled (not started)
#
# With --root other than /, nothing touches the running system: no systemctl, the
# enable is the wants symlink systemctl would create. The venv's scripts then name
# their interpreter by its path under that root, so they run in place (CI) but are not
# meant to be copied elsewhere.
#
# Options:
#   --python PATH       the interpreter for the venv (default: python3 on PATH); checked >= 3.10
#   --source DIR        install from this source tree (default: the tree holding this script)
#   --package SPEC      install this pip requirement instead (a wheel file, a URL, a name)
#   --root DIR          install into DIR as if it were / (staging, CI)
#   --no-deps           pip install without dependencies (they are already in the venv)
#   --offline           pip: no index, no build isolation (every build dependency present)
#   --system-site-packages   let the venv see the interpreter's site-packages
#   --no-enable         do not enable the unit
#   -h, --help          this text
#
# Exit status: 0 done; 2 bad usage or an unsuitable Python; anything else: a step failed.
set -eu

PREFIX=/opt/spot-supervisor
UNIT_NAME=spot-supervisor.service
CONFIG_DIR=/etc/spot-supervisor
UNIT_DIR=/etc/systemd/system
WANTED_BY=multi-user.target

here=$(cd "$(dirname "$0")" && pwd)
root=/
python=
source_dir=
package=
no_deps=
offline=
site=
enable=yes

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --python) [ $# -ge 2 ] || die "--python needs a path"; python=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; source_dir=$2; shift 2 ;;
        --package) [ $# -ge 2 ] || die "--package needs a pip requirement"; package=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --no-deps) no_deps=yes; shift ;;
        --offline) offline=yes; shift ;;
        --system-site-packages) site=yes; shift ;;
        --no-enable) enable=; shift ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$source_dir" ] && [ -n "$package" ] && die "--source and --package exclude each other"
if [ -z "$package" ]; then
    source_dir=${source_dir:-$(dirname "$here")}
    [ -f "$source_dir/pyproject.toml" ] || die "--source $source_dir: no pyproject.toml there"
    source_dir=$(cd "$source_dir" && pwd)
fi
[ -f "$here/$UNIT_NAME" ] || die "$here/$UNIT_NAME is missing (run the script from the source tree)"

# --- root -----------------------------------------------------------------------------
case $root in
    /) dest= ;;
    /*) dest=${root%/} ;;
    *) die "--root $root: must be an absolute path" ;;
esac
[ -z "$dest" ] || mkdir -p "$dest"

# --- an explicit Python >= 3.10 --------------------------------------------------------
if [ -z "$python" ]; then
    python=$(command -v python3 || true)
    [ -n "$python" ] || die "no python3 on PATH; give one with --python (3.10 or newer)"
fi
[ -x "$python" ] || python=$(command -v "$python" || true)
[ -n "$python" ] && [ -x "$python" ] || die "--python: not an executable"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    die "$python is Python $("$python" -c 'import platform; print(platform.python_version())'), spot-supervisor needs 3.10 or newer (give one with --python)"
fi
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$python lacks venv/ensurepip (Debian/Ubuntu: apt-get install python3-venv)"

# --- the venv ---------------------------------------------------------------------------
venv=$dest$PREFIX/venv
if [ -x "$venv/bin/python" ] \
    && "$venv/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    say "reusing $venv"
else
    say "creating $venv with $python ($("$python" -c 'import platform; print(platform.python_version())'))"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if [ -n "$site" ]; then
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi

set -- --disable-pip-version-check --no-input --quiet
[ -z "$no_deps" ] || set -- "$@" --no-deps
[ -z "$offline" ] || set -- "$@" --no-index --no-build-isolation
if [ -n "$package" ]; then
    say "pip install $package"
    "$venv/bin/python" -m pip install "$@" --upgrade "$package"
else
    say "pip install $source_dir"
    # A copy, so a build never writes into (or depends on leftovers in) the source tree.
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    tar -C "$source_dir" --exclude=.git --exclude=.venv --exclude='*.egg-info' \
        --exclude=build --exclude=dist --exclude=__pycache__ --exclude='.*_cache' -cf - . \
        | tar -C "$build" -xf -
    "$venv/bin/python" -m pip install "$@" --upgrade --force-reinstall --no-cache-dir "$build"
fi
"$venv/bin/spot-supervisor" --version >/dev/null || { echo "install.sh: the installed spot-supervisor does not run" >&2; exit 1; }

# --- files -------------------------------------------------------------------------------
install -d -m 0755 "$dest$PREFIX" "$dest$UNIT_DIR"
if [ -n "$source_dir" ] && [ -f "$source_dir/README.md" ]; then
    install -m 0644 "$source_dir/README.md" "$dest$PREFIX/README.md"
fi
install -m 0644 "$here/$UNIT_NAME" "$dest$UNIT_DIR/$UNIT_NAME"
say "installed $UNIT_DIR/$UNIT_NAME"

install -d -m 0755 "$dest$CONFIG_DIR"
if [ -e "$dest$CONFIG_DIR/config.toml" ]; then
    say "kept the existing $CONFIG_DIR/config.toml"
else
    install -m 0640 "$here/config.toml" "$dest$CONFIG_DIR/config.toml"
    say "installed the example $CONFIG_DIR/config.toml: edit it (or write it from user-data)"
fi

# --- enable (never start: user-data writes the run's config, then starts the unit) ------
if [ -n "$enable" ]; then
    if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable "$UNIT_NAME"
    else
        # What `systemctl enable` does for WantedBy=, without asking a running systemd.
        install -d -m 0755 "$dest$UNIT_DIR/$WANTED_BY.wants"
        ln -sfn "$UNIT_DIR/$UNIT_NAME" "$dest$UNIT_DIR/$WANTED_BY.wants/$UNIT_NAME"
        say "enabled $UNIT_NAME ($WANTED_BY.wants symlink)"
    fi
fi
say "done: $("$venv/bin/spot-supervisor" --version)"
