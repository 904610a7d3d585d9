#!/usr/bin/env sh
# Installs llama-cpp-python into the Python given as $1, built for every CPU it will meet, not this one.
#
# PyPI has no wheels of llama-cpp-python for Linux, so pip builds it from its sdist, and llama.cpp's
# default build (GGML_NATIVE) targets the build machine's own CPU: such a build crashed (SIGSEGV at the
# first eval) on a Xeon with AMX, and a wheel built on one machine dies with SIGILL on an older one.
# Here the sdist (pinned with its hash in requirements/llama-cpp-python.txt) is built with
# GGML_NATIVE=OFF: llama.cpp then targets x86-64 with AVX2, FMA, F16C and BMI2 (any x86-64 CPU since
# 2013-2015), and the CPU check below says so clearly on an older one. LLAMA_CMAKE_ARGS adds flags,
# e.g. LLAMA_CMAKE_ARGS="-DGGML_CUDA=on" for NVIDIA GPUs.
#
# The wheel is kept in a cache keyed by the sdist's hash, the flags, the Python and the platform
# (COMPUTE_SWARM_WHEEL_CACHE, default ~/.cache/compute-swarm/wheels), so a second set-up installs it
# in seconds instead of building it again (about 7 minutes on 2 cores).
#
# With --wheel-into DIR the wheel is copied into DIR instead of installed: installers/build-app.sh
# publishes it beside the packaged app, whose engine runtime fetches it (no public index has one).
set -eu
python="${1:?usage: installers/llama-cpp.sh PYTHON [--wheel-into DIR]}"
wheel_into=""
[ "${2:-}" = "--wheel-into" ] && wheel_into="${3:?--wheel-into needs a folder}"
here="$(cd "$(dirname "$0")/.." && pwd)"
pin="$here/requirements/llama-cpp-python.txt"

# On x86-64, the portable build needs AVX2, FMA and F16C: say so now rather than crash with SIGILL.
case "$(uname -m)" in
    x86_64 | amd64)
        if [ -r /proc/cpuinfo ]; then
            flags="$(grep -m1 '^flags' /proc/cpuinfo)"
            for flag in avx2 fma f16c; do
                case " $flags " in
                    *" $flag "*) ;;
                    *)
                        echo "installers/llama-cpp.sh: this CPU lacks $flag; llama.cpp's portable x86-64 build needs AVX2, FMA and F16C (Intel Haswell / AMD Excavator or newer). Inference will not run on this machine; LoRA training still does." >&2
                        exit 0
                        ;;
                esac
            done
        fi
        ;;
esac

cmake_args="-DGGML_NATIVE=OFF ${LLAMA_CMAKE_ARGS:-}"
sdist_hash="$(sed -n 's/.*--hash=sha256:\([0-9a-f]*\).*/\1/p' "$pin" | head -n 1)"
platform_tag="$("$python" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')"
key="$(printf '%s\n%s\n%s\n' "$sdist_hash" "$cmake_args" "$platform_tag" | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
cache="${COMPUTE_SWARM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/compute-swarm/wheels}/llama-cpp-python-$key"

wheel="$(ls "$cache"/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python for any x86-64 CPU with AVX2 ($cmake_args); about 7 minutes on 2 cores, once"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # The sdist is checked against the lock's hash and built in one step; the build's own tools
    # (scikit-build-core, cmake) come from PyPI in pip's isolated build environment.
    CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 "$python" -m pip wheel --quiet --no-deps --no-cache-dir \
        --no-binary llama-cpp-python --require-hashes -r "$pin" -w "$work/wheel"
    mkdir -p "$cache"
    mv "$work"/wheel/llama_cpp_python-*.whl "$cache/"
    wheel="$(ls "$cache"/llama_cpp_python-*.whl | head -n 1)"
fi
if [ -n "$wheel_into" ]; then
    mkdir -p "$wheel_into"
    cp "$wheel" "$wheel_into/"
    echo "$wheel_into/$(basename "$wheel")"
    exit 0
fi
"$python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
# What the library was built for, read in a child so that a bad build cannot take set-up down with it.
"$python" -c 'import llama_cpp; print("llama.cpp:", llama_cpp.llama_print_system_info().decode().strip())'
