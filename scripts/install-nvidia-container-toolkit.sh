#!/usr/bin/env bash
# Install the NVIDIA Container Toolkit on Debian/Ubuntu and register its runtime with Docker, so
# Compose's GPU reservation (driver: nvidia) works. Needs root, a working NVIDIA driver (nvidia-smi)
# and Docker. Safe to re-run. Reference: NVIDIA's install guide for the Container Toolkit (apt).
set -euo pipefail

die() { printf 'install-nvidia-container-toolkit: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"
command -v apt-get >/dev/null || die "this script is for Debian/Ubuntu (apt-get not found)"
command -v nvidia-smi >/dev/null || die "no NVIDIA driver (nvidia-smi not found): install the driver first"
nvidia-smi >/dev/null || die "nvidia-smi fails: the NVIDIA driver is not working"
command -v docker >/dev/null || die "Docker is not installed"

keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
list=/etc/apt/sources.list.d/nvidia-container-toolkit.list

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates curl gnupg
curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --batch --yes --dearmor -o "$keyring"
curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
    | sed "s#deb https://#deb [signed-by=$keyring] https://#g" > "$list"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-container-toolkit

# Writes the "nvidia" runtime into /etc/docker/daemon.json.
nvidia-ctk runtime configure --runtime=docker
if command -v systemctl >/dev/null && systemctl is-active --quiet docker; then
    systemctl restart docker
else
    echo "restart the Docker daemon to load the nvidia runtime"
fi

docker info --format '{{json .Runtimes}}' | grep -q nvidia || die "the nvidia runtime is not registered with Docker"
echo "NVIDIA Container Toolkit installed; check with: make doctor"
