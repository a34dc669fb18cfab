#!/bin/sh
# The steps the Dockerfile's targets share, so the CPU and CUDA images stay one recipe.
#   setup.sh os build|runtime   system packages (python3 unless the base image has one; redis-server at runtime)
#   setup.sh venv cpu|cuda      /opt/zeroc: torch, then the project from /src
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
    # The KV store's shared index in compose.yaml runs the image's redis-server (redis-cli is its health check).
    [ "$1" = runtime ] && pkgs="$pkgs redis-server"
    if [ -n "$pkgs" ]; then apt_install $pkgs; fi
}

venv() {
    python3 -m venv /opt/zeroc
    pip="/opt/zeroc/bin/pip install --no-cache-dir -q --disable-pip-version-check"
    # deploy/docker/local/ (copied to /local): a CA bundle for pip behind a TLS-intercepting proxy, a torch wheel.
    if [ -f /local/pip-ca.crt ]; then export PIP_CERT=/local/pip-ca.crt; fi
    wheel=$(ls /local/torch-"$TORCH_VERSION"*.whl 2> /dev/null | head -n 1 || true)
    if [ "$1" = cpu ] && [ -n "$wheel" ]; then
        $pip "$wheel"  # a CPU wheel placed in the build context
    elif [ "$1" = cpu ]; then
        $pip --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"  # PyTorch's CPU-only index
    else
        $pip "torch==$TORCH_VERSION"  # PyPI's Linux build: CUDA, with NCCL
    fi
    if [ "$1" = cuda ]; then extras="[gpu]"; else extras=""; fi
    $pip "/src$extras"
    # The sources were only an input to pip: the venv holds the installed packages.
    /opt/zeroc/bin/python -c "import torch, zeroc.cli; print('torch', torch.__version__)"
}

user() {
    useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin zeroc
    mkdir -p /models
}

case "$1" in
    os) os_packages "$2" ;;
    venv) venv "$2" ;;
    user) user ;;
    *) echo "usage: $0 os build|runtime | venv cpu|cuda | user" >&2; exit 2 ;;
esac
