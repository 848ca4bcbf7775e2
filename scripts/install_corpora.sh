#!/bin/sh
# Install the optional Debian text packages that tikmix_hf.corpora.local_corpus() reads.
#
# Without them the local corpus still works (Python stdlib code, docstrings and pydoc topics);
# with them it gains fortunes categories, the KJV Bible, three dictionaries, C library man
# pages and the Python documentation sources. This script never fails a build: when it cannot
# install (not root, no apt-get, no mirror) it says why and exits 0.
#
# Environment:
#   TIKMIX_SKIP_CORPORA=1   do nothing
#   TIKMIX_APT_UPDATE=1     run "apt-get update" even if the package lists look usable

set -u

say() { echo "install_corpora: $*"; }

if [ "${TIKMIX_SKIP_CORPORA:-0}" = "1" ]; then
    say "TIKMIX_SKIP_CORPORA=1, skipping"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    say "not running as root, skipping (the stdlib-only corpus still works)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v apt-cache >/dev/null 2>&1; then
    say "apt-get not found, skipping (the stdlib-only corpus still works)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive

# True if apt knows an installable candidate for the package.
has_candidate() {
    cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# The reST sources of the docs of the system Python (Debian's python3 may differ from the
# Python that runs tikmix_hf; the text is what matters, not the exact version).
doc_pkg=""
for py in /usr/bin/python3 python3; do
    ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    doc_pkg="python$ver-doc"
    break
done

missing=""
for pkg in fortunes fortunes-min bible-kjv dict-gcide dict-foldoc dict-jargon manpages-dev $doc_pkg; do
    installed "$pkg" || missing="$missing $pkg"
done
if [ -z "$missing" ]; then
    say "all corpus packages are already installed"
    exit 0
fi

if [ "${TIKMIX_APT_UPDATE:-0}" = "1" ] || ! has_candidate fortunes; then
    say "refreshing package lists"
    apt-get update -qq || say "apt-get update failed; trying with the lists we have"
fi

available=""
for pkg in $missing; do
    if has_candidate "$pkg"; then
        available="$available $pkg"
    elif [ "$pkg" = "$doc_pkg" ] && has_candidate python3-doc; then
        available="$available python3-doc"
    else
        say "no candidate for $pkg, leaving it out"
    fi
done
if [ -z "$available" ]; then
    say "none of the missing corpus packages is available here, skipping"
    exit 0
fi

say "installing:$available"
start=$(date +%s)
# shellcheck disable=SC2086  # word splitting of the package list is intended
if ! apt-get install -y -qq --no-install-recommends $available; then
    say "installing them together failed; trying one at a time"
    for pkg in $available; do
        apt-get install -y -qq --no-install-recommends "$pkg" || say "could not install $pkg"
    done
fi
say "done in $(( $(date +%s) - start )) s"
exit 0
