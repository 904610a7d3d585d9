#!/bin/sh
# Regenerates the lock files in requirements/ from pyproject.toml. Run by `make lock` from the repo root.
#
# Each role gets its own lock (requirements/<role>.txt), compiled by uv for every platform at once
# (--universal: Linux, Windows, macOS; Python 3.10 and later) with the sha256 of every file, so that
# set-up installs exactly these files: pip install --require-hashes --no-deps -r requirements/<role>.txt
#
# Left out of the locks on purpose:
#  - torch: each user picks the build for their GPU (CPU, CUDA, ROCm) and set-up installs it first,
#    on its own (TORCH_SPEC in the Makefile); a packaged app fetches the build that fits from
#    requirements/torch-<build>-<os>.txt, which installers/torch-locks.sh writes at the end. The
#    locks are still resolved *with* torch==$TORCH_VERSION, so its pure-Python dependencies (sympy,
#    networkx, filelock, fsspec, jinja2, setuptools...) are locked at versions it accepts, and triton
#    is the exact one its Linux wheels pin.
#  - torch's CUDA-only dependencies (the CUDA build of torch brings its own): the NVIDIA_PACKAGES below,
#    i.e. everything torch $TORCH_VERSION's Linux metadata pulls in through cuda-toolkit[...],
#    cuda-bindings, nvidia-cudnn/cusparselt/nccl/nvshmem.
#  - llama-cpp-python: compiled from its sdist on the user's machine with portable CPU flags by a separate
#    script, from requirements/llama-cpp-python.txt (its sdist, pinned with its hash). Its own
#    dependencies (numpy, diskcache, jinja2, typing-extensions) do stay in the locks.
set -eu

UV_VERSION=0.13.9
TORCH_VERSION=2.13.0      # keep equal to TORCH_SPEC in the Makefile
TRITON_SERIES=3.7         # torch 2.13.0's Linux wheels pin triton==3.7.1; triton-windows must be the same series
LLAMA_CPP_VERSION=0.3.36
PYTHON_FLOOR=3.10         # requires-python in pyproject.toml
NVIDIA_PACKAGES="cuda-toolkit cuda-bindings cuda-pathfinder nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
 nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
 nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx"

out=requirements
here=$(pwd)
test -f pyproject.toml || { echo "run from the repo root" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

# A pinned uv in a throwaway venv (uv reads neither pip's config nor its find-links: it resolves from PyPI).
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
uv="$tmp/venv/bin/uv"

# Only the dependency lists matter: compile against a copy of pyproject.toml, away from the source tree.
mkdir "$tmp/project"
cp pyproject.toml "$tmp/project/"
# The pins (the file is named in the locks' "via" notes as -c refresh-locks-pins.txt).
cat > "$tmp/project/refresh-locks-pins.txt" <<PINS
torch==$TORCH_VERSION
triton-windows==$TRITON_SERIES.*
llama-cpp-python==$LLAMA_CPP_VERSION
PINS

no_emit="--no-emit-package torch --no-emit-package llama-cpp-python"
for p in $NVIDIA_PACKAGES; do no_emit="$no_emit --no-emit-package $p"; done

compile() {  # compile <output> <uv pip compile arguments...>: the header names `make lock`, no temp path
    target=$1; shift
    (cd "$tmp/project" && "$uv" pip compile --quiet --universal --python-version "$PYTHON_FLOOR" \
        --generate-hashes --custom-compile-command "make lock" "$@" -o "$here/$out/$target")
    echo "$out/$target"
}

lock() {  # lock <role> [extras...]: pyproject.toml's dependencies plus the given extras
    role=$1; shift
    extras=""
    for e in "$@"; do extras="$extras --extra $e"; done
    # shellcheck disable=SC2086
    compile "$role.txt" pyproject.toml -c refresh-locks-pins.txt $no_emit $extras
}

lock base
lock coordinator coordinator
lock postgres postgres
lock node node
lock desktop desktop
lock app app
lock dev engine coordinator desktop dev

# The llama-cpp-python sdist alone, for its build script:
#   pip download --no-binary :all: --no-deps --require-hashes -r requirements/llama-cpp-python.txt
echo "llama-cpp-python==$LLAMA_CPP_VERSION" > "$tmp/project/llama.in"
compile llama-cpp-python.txt llama.in --no-deps --no-annotate
# PyInstaller, which packages the tray app (installers/build-app.sh).
echo "pyinstaller" > "$tmp/project/installer.in"
compile installer.txt installer.in
# uv itself, for installers that use uv to install a lock.
echo "uv==$UV_VERSION" > "$tmp/project/uv.in"
compile uv.txt uv.in --no-annotate

# The torch builds a packaged app's engine runtime takes (requirements/torch-<build>-<os>.txt), against
# the node lock just written.
sh installers/torch-locks.sh
