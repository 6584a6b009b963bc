#!/usr/bin/env bash
# Builds llama.cpp's own C++ `llama-server` and `llama-perplexity` from the vendor/llama.cpp
# tree of the llama-cpp-python source distribution (PyPI is the only source reachable), with
# cmake and ninja from PyPI. The result is cached in DIR (git-ignored); about 30 minutes cold
# on 2 cores. For `make bench` and the perplexity fixture, never for `make test`.
set -euo pipefail
DIR=${1:?usage: build_llama_cpp.sh DIR VERSION}
VERSION=${2:?usage: build_llama_cpp.sh DIR VERSION}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
if [ ! -x "$DIR/tools/bin/cmake" ]; then
	"$PYTHON" -m venv "$DIR/tools"
	"$DIR/tools/bin/pip" install --quiet cmake ninja
fi
SRC="$DIR/llama-cpp-python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
	"$DIR/tools/bin/pip" download --quiet --no-binary llama-cpp-python --no-deps -d "$DIR/sdist" \
		"llama-cpp-python==$VERSION"
	tar -xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
	mv "$DIR/llama_cpp_python-$VERSION" "$SRC"
fi
export PATH="$DIR/tools/bin:$PATH"
cmake -S "$SRC/vendor/llama.cpp" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
	-DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
ninja -C "$DIR/build" llama-server llama-perplexity
"$DIR/build/bin/llama-server" --version
