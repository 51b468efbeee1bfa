#!/usr/bin/env bash
# Make a Debian base image without a container registry: debootstrap a minimal bookworm from the
# Debian mirror apt already uses, then `docker import` it. For hosts that cannot pull
# debian:bookworm-slim (air-gapped, or no registry reachable); the result is a drop-in BASE_IMAGE.
#
#   bash scripts/docker_base.sh [NAME]          # default NAME: tfb-base:bookworm; no-op if it exists
#
# DEBIAN_MIRROR overrides the mirror (default: the first Debian URI in /etc/apt/sources.list*);
# point it at a snapshot (https://snapshot.debian.org/archive/debian/<date>/) for a base that
# is the same byte for byte a year later. Needs root (debootstrap), docker and debootstrap.
set -euo pipefail

NAME="${1:-tfb-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"

if docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "docker_base: $NAME exists"
    exit 0
fi

apt_mirror() {
    # deb822 (*.sources: "URIs: ...") and one-line ("deb URI suite ...") formats; skip -security.
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -v '^\s*#' \
        | grep -oE '(https?|file)://[^ ]+/debian/?( |$)' \
        | grep -v security | head -n1 | tr -d ' ' || true
}
MIRROR="${DEBIAN_MIRROR:-$(apt_mirror)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if ! command -v debootstrap >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ROOTFS="$(mktemp -d /tmp/tfb-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "docker_base: debootstrap --variant=minbase $SUITE from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 20 "$ROOTFS.log"; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"

# Security and point-release updates, as debian:bookworm-slim has them; a security mirror is
# only added for the public Debian mirror (a private or snapshot mirror names its own).
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    case "$MIRROR" in
        http://deb.debian.org/*|https://deb.debian.org/*)
            echo "deb ${MIRROR%/debian*}/debian-security $SUITE-security main" ;;
    esac
} >"$ROOTFS/etc/apt/sources.list"
# What the slim images do to stay small: no apt caches or package lists, no docs or man pages.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/var/log/*.log
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
EOF

tar -C "$ROOTFS" --numeric-owner -c . \
    | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
        --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$NAME" >/dev/null
echo "docker_base: $NAME ($(docker image inspect -f '{{.Size}}' "$NAME" | awk '{printf "%.0f MB", $1/1e6}'))"
