#!/bin/sh
# Locks the torch builds a packaged tray app fetches as its engine runtime (compute_swarm/desktop/runtime):
# requirements/torch-<build>-<os>.txt, one a build and operating system, with the sha256 of every file.
# The runtime is requirements/node.txt plus one of these, so each is resolved with node.txt as its
# constraints (the two agree on torch's own dependencies) and adds what the build brings: CUDA's and
# ROCm's libraries. Run by `make lock` (installers/refresh-locks.sh), or alone:
#     sh installers/torch-locks.sh [BUILD...]
#
# Each build comes from its index at download.pytorch.org; mps (Apple's GPUs) is PyPI's torch for macOS. A build whose index does
# not answer is left as it was, and said so. TORCH_WHEELS names a folder of torch wheels to lock the
# CPU build from instead (a machine with no route to download.pytorch.org: the lock then holds the
# hashes of that folder's files, the very files PyTorch publishes).
set -eu

TORCH_VERSION=2.13.0      # keep equal to TORCH_SPEC in the Makefile and to refresh-locks.sh
PYTHON_VERSION=3.11       # the packaged app's interpreter (installers/), whose wheels the runtime takes
UV_VERSION=0.13.9
PYTORCH_INDEX=https://download.pytorch.org/whl
BUILDS="${*:-cpu cu126 cu128 cu130 rocm6.4 mps}"

out=requirements
test -f pyproject.toml || { echo "run from the repo root" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
uv="$tmp/venv/bin/uv"
cp "$out/node.txt" "$tmp/node.txt"

lock_build() {  # lock_build <build> <os> <uv platform> <torch requirement> <index arguments...>
    build=$1 os=$2 platform=$3 requirement=$4; shift 4
    echo "$requirement" > "$tmp/torch.in"
    target="$out/torch-$build-$os.txt"
    if (cd "$tmp" && "$uv" pip compile --quiet --python-version "$PYTHON_VERSION" --python-platform "$platform" \
            --generate-hashes --custom-compile-command "make lock" -c node.txt "$@" torch.in -o "$tmp/out.txt"); then
        mv "$tmp/out.txt" "$target"
        echo "$target"
    else
        echo "torch-locks.sh: $build for $os could not be resolved (is its index reachable?); $target left as it was" >&2
    fi
}

for build in $BUILDS; do
    case $build in
        mps)  # Apple's GPUs: PyPI's torch for macOS (its wheels are for macOS 14 and later)
            MACOSX_DEPLOYMENT_TARGET=14.0 lock_build mps macos aarch64-apple-darwin "torch==$TORCH_VERSION" ;;
        cpu)
            if [ -n "${TORCH_WHEELS:-}" ]; then
                lock_build cpu linux x86_64-manylinux_2_28 "torch==$TORCH_VERSION+cpu" --find-links "$TORCH_WHEELS"
            else
                lock_build cpu linux x86_64-manylinux_2_28 "torch==$TORCH_VERSION+cpu" \
                    --index-url "$PYTORCH_INDEX/cpu" --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match
                lock_build cpu windows x86_64-pc-windows-msvc "torch==$TORCH_VERSION+cpu" \
                    --index-url "$PYTORCH_INDEX/cpu" --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match
            fi ;;
        rocm*)
            lock_build "$build" linux x86_64-manylinux_2_28 "torch==$TORCH_VERSION+$build" \
                --index-url "$PYTORCH_INDEX/$build" --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match ;;
        cu*)
            for target in "linux x86_64-manylinux_2_28" "windows x86_64-pc-windows-msvc"; do
                # shellcheck disable=SC2086
                set -- $target
                lock_build "$build" "$1" "$2" "torch==$TORCH_VERSION+$build" \
                    --index-url "$PYTORCH_INDEX/$build" --extra-index-url https://pypi.org/simple --index-strategy unsafe-best-match
            done ;;
        *) echo "torch-locks.sh: unknown build $build" >&2; exit 2 ;;
    esac
done
