#!/usr/bin/env bash
# A Debian base image for docker/Dockerfile on machines that cannot pull from Docker Hub.
#
#   bash scripts/build_base_image.sh                 # -> local/debian:bookworm (about 35 s; root, debootstrap)
#   docker build --network host --build-arg BASE_IMAGE=local/debian:bookworm -f docker/Dockerfile -t swarm:cpu .
#
# The root filesystem comes from the Debian mirror apt already uses here (or $MIRROR), so nothing but that
# mirror is reached. The image trusts what this machine trusts: the extra certificate authorities in
# /usr/local/share/ca-certificates (a TLS-intercepting proxy's, for instance) are added, so pip inside a build
# reaches the same package index the host's pip does. The image is this machine's own; never push it.
set -euo pipefail
TAG=${1:-local/debian:bookworm}
SUITE=${SUITE:-bookworm}

apt_mirror() {  # the first non-security Debian URI in apt's sources (one-line or deb822 format)
  grep -hsE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      /etc/apt/sources.list.d/*.sources \
    | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//; s/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
    | awk '{print $1}' | grep -v security | grep -m1 '/debian/\?$' || true
}
MIRROR=${MIRROR:-$(apt_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (apt-get install debootstrap docker.io)" >&2; exit 1; }
done

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $SUITE from $MIRROR ..."
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
  || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' - "$TAG" >/dev/null
echo "built $TAG"
