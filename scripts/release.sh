#!/usr/bin/env bash
# `make release`: a stripped release build of smsgw for this machine's target, and its
# SHA-256 checksum, in target/release-artifacts/ (under CARGO_TARGET_DIR when set):
#
#   smsgw-<version>-<target triple>          the binary (version from Cargo.toml)
#   smsgw-<version>-<target triple>.sha256   "<hex digest>  <file name>", as sha256sum
#                                            writes it: sha256sum -c checks it there
#
#   scripts/release.sh                 build with cargo and package the result
#   scripts/release.sh --from BINARY   package a binary built elsewhere (the tests use it;
#                                      it is copied as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
target=$(rustc -vV | sed -n 's/^host: //p')
[[ -n $version && -n $target ]] || { echo "release: no version or target" >&2; exit 1; }
target_dir=${CARGO_TARGET_DIR:-target}
out=${RELEASE_DIR:-$target_dir/release-artifacts}
name=smsgw-$version-$target

if [[ ${1:-} == --from ]]; then
    binary=${2:?release: --from needs a binary}
else
    # Stripped by cargo itself, so no binutils are needed. The commit comes from .git
    # (build.rs), as `smsgw --version` then reports it.
    CARGO_PROFILE_RELEASE_STRIP=symbols "$CARGO" build --release --locked --bin smsgw
    binary=$target_dir/release/smsgw
fi

mkdir -p "$out"
cp "$binary" "$out/$name"
chmod 755 "$out/$name"
(cd "$out" && sha256sum "$name" >"$name.sha256" && sha256sum --quiet -c "$name.sha256")
echo "release: $out/$name ($("$out/$name" --version))"
echo "release: $out/$name.sha256"
