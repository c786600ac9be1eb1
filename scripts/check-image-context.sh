#!/usr/bin/env bash
# Builds smsgw from exactly what the Dockerfile's build stage copies, without a container
# engine: a file the build needs but the Dockerfile does not copy (or .dockerignore leaves
# out), or a Cargo.lock that does not match Cargo.toml, fails here as it would fail
# `docker build`.
#
# The paths come from the build stage's COPY lines in the Dockerfile itself, so this check
# cannot drift from it. They are copied, less what .dockerignore excludes, into a clean
# temporary directory laid out as the stage's WORKDIR, and `cargo build --locked --bin
# smsgw` runs there. The image builds with --release; this check uses the dev profile to
# keep CI lean: a missing file or a lockfile mismatch fails either profile the same way.
# When the stage declares `ARG SMSGW_COMMIT` before it builds, this build gets the
# checkout's commit as `docker build --build-arg SMSGW_COMMIT=...` would pass it, and
# `smsgw --version` must report it ("unknown" otherwise, as the image's build finds no
# .git).
#
# Anything in the build stage this script does not understand (ADD, COPY --from, JSON
# form, wildcards, line continuations, `!` in .dockerignore) fails it rather than being
# guessed at.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
CARGO=${CARGO:-cargo}

die() {
    echo "check-image-context: $*" >&2
    exit 1
}

# The build stage: the lines after `FROM ... AS build`, up to the next FROM.
stage=$(awk '
    toupper($1) == "FROM" { in_stage = (toupper($(NF - 1)) == "AS" && $NF == "build"); next }
    in_stage { print }
' Dockerfile)
[[ -n $stage ]] || die "the Dockerfile has no stage named build (FROM ... AS build)"

workdir=/
commit_arg=no
built=no
sources=()      # every source path, for the context
copies=()       # one entry per COPY: "dest<TAB>source<TAB>source..."
while IFS= read -r line; do
    read -r instruction rest <<<"$line" || true
    case ${instruction^^} in
    WORKDIR)
        case $rest in
        /*) workdir=$rest ;;
        *) workdir=${workdir%/}/$rest ;;
        esac
        ;;
    ARG)
        [[ ${rest%%=*} == SMSGW_COMMIT && $built == no ]] && commit_arg=yes
        ;;
    RUN)
        [[ $rest == *"cargo build"* ]] && built=yes
        ;;
    ADD) die "ADD is not supported: $line" ;;
    COPY)
        [[ $line == *\\ ]] && die "COPY continued on the next line is not supported: $line"
        [[ $rest == \[* ]] && die "the JSON form of COPY is not supported: $line"
        set -f
        # shellcheck disable=SC2206 # split into words, without globbing (set -f)
        words=($rest)
        set +f
        args=()
        for word in "${words[@]}"; do
            case $word in
            --from=*) die "COPY --from is not supported in the build stage: $line" ;;
            --*) ;; # --chown, --chmod, --link: no bearing on what the build can read
            *) args+=("$word") ;;
            esac
        done
        ((${#args[@]} >= 2)) || die "COPY needs a source and a destination: $line"
        dest=${args[-1]}
        entry=$dest
        for source in "${args[@]:0:${#args[@]}-1}"; do
            [[ $source == *[*?[]* ]] && die "wildcards in COPY are not supported: $line"
            source=${source#./}
            [[ $source == /* || $source == .. || $source == ../* || $source == */../* ]] &&
                die "COPY source outside the context: $line"
            sources+=("$source")
            entry+=$'\t'$source
        done
        copies+=("$entry")
        ;;
    esac
done <<<"$stage"
((${#copies[@]} > 0)) || die "the build stage copies nothing"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smsgw-image-context.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
context=$tmp/context
build=$tmp/build
mkdir -p "$context" "$build"

# The context: the copied paths as they are in this checkout, less what .dockerignore
# excludes (docker sends the builder nothing it excludes). Patterns are matched from the
# context's root; `*` stays within a directory, `**` spans any number of them.
for source in "${sources[@]}"; do
    if [[ -e $source ]]; then
        cp -a --parents "$source" "$context/"
    fi
done
if [[ -f .dockerignore ]]; then
    while IFS= read -r pattern || [[ -n $pattern ]]; do
        pattern=${pattern%$'\r'}
        [[ -z ${pattern//[[:space:]]/} || $pattern == \#* ]] && continue
        [[ $pattern == !* ]] && die ".dockerignore exceptions (!) are not supported: $pattern"
        pattern=${pattern#/}
        pattern=${pattern%/}
        (
            cd "$context"
            shopt -s globstar dotglob nullglob
            # shellcheck disable=SC2206 # the pattern is meant to glob
            matches=($pattern)
            if ((${#matches[@]} > 0)); then
                rm -rf -- "${matches[@]}"
            fi
        )
    done <.dockerignore
fi

# The build stage's filesystem: each COPY as docker does it, relative to the WORKDIR.
for entry in "${copies[@]}"; do
    IFS=$'\t' read -r -a fields <<<"$entry"
    dest=${fields[0]}
    copied=("${fields[@]:1}")
    case $dest in
    /*)
        [[ $dest == "$workdir" || $dest == "${workdir%/}"/* ]] ||
            die "COPY to $dest, outside the WORKDIR $workdir, is not supported"
        dest=${dest#"${workdir%/}"}
        dest=${dest#/}
        dest=${dest:-.}
        ;;
    esac
    # A destination is a directory when it ends with / or is one already, or when several
    # sources go to it; otherwise a single file is copied to that name.
    into_dir=no
    if [[ $dest == */ || $dest == . || -d $build/$dest || ${#copied[@]} -gt 1 ]]; then
        into_dir=yes
    fi
    for source in "${copied[@]}"; do
        [[ -e $context/$source ]] ||
            die "COPY $source: not in the build context (missing, or excluded by .dockerignore)"
        if [[ -d $context/$source ]]; then
            mkdir -p "$build/$dest"
            cp -a "$context/$source/." "$build/$dest/"
        elif [[ $into_dir == yes ]]; then
            mkdir -p "$build/$dest"
            cp -a "$context/$source" "$build/$dest/"
        else
            mkdir -p "$(dirname "$build/$dest")"
            cp -a "$context/$source" "$build/$dest"
        fi
    done
done

# The repo's own target directory, so that the dependencies the tests compiled are reused:
# on a 2-core machine this costs about 35 s (smsgw itself, built from the copy), where a
# target directory of its own compiles every dependency again on a fresh machine (about
# 3.5 min). It leaves this build as target/debug/smsgw: the same source at the same
# commit as the checkout's, so `make test` runs it first, before the tests build theirs.
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$repo/$target_dir

commit=$(git rev-parse --short HEAD 2>/dev/null || true)
if [[ $commit_arg == yes && -n $commit ]]; then
    expected=$commit
    commit_env=(SMSGW_COMMIT="$commit")
else
    expected=unknown
    commit_env=(-u SMSGW_COMMIT)
fi

echo "check-image-context: building from ${sources[*]}"
start=$SECONDS
# GIT_CEILING_DIRECTORIES: git's search for a repository stops at the temporary directory,
# so that build.rs finds no .git here either.
(
    cd "$build"
    env "${commit_env[@]}" GIT_CEILING_DIRECTORIES="$tmp" CARGO_TARGET_DIR="$target_dir" \
        "$CARGO" build --locked --bin smsgw
) || die "the image's build stage fails (see above): fix the Dockerfile's COPY lines or .dockerignore"

version=$("$target_dir/debug/smsgw" --version)
[[ $version == *" ($expected)" ]] ||
    die "smsgw --version says '$version'; built as the image is, it should report commit $expected"
echo "check-image-context: ok in $((SECONDS - start))s: $version"
