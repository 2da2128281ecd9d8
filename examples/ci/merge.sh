#!/usr/bin/env bash
# Merge from a recipe, verify the checkpoint, and lay out an artifact directory: the CI step of examples/ci.
#
#   examples/ci/merge.sh RECIPE [ARTIFACT_DIR]
#
# ARTIFACT_DIR (default: artifact/) receives
#   merged/          the decoupled checkpoint (or a plain transformers model for `mask: none` / a mergekit config)
#   reports/         merge.json (plan, densities, thresholds) and verify.json, mmer's --json documents
#   SHA256SUMS       the checksum of every file in merged/, for whoever downloads the artifact
#
# Environment: MMER (the mmer command, default `mmer`), VERIFY_SOURCES=1 (also rebuild each modality and compare
# it with its source model: reads every source again), MMER_MERGE_ARGS (extra flags for `mmer merge`, e.g.
# "--device cuda").
#
# Exit codes are mmer's own (README.md, "Exit codes"), passed through so the job's status says what went wrong:
#   0  merged and verified
#   2  usage error: the recipe, a flag or a path is wrong; fix the recipe and push again (retrying will not help)
#   1  runtime failure: a model is corrupt, incompatible or unreachable, the disk is full, or verify found a
#      mismatch; the inputs or the machine must change
#   130 cancelled (SIGINT/SIGTERM): mmer removes its partial output
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 RECIPE [ARTIFACT_DIR]" >&2
    exit 2
fi
recipe=$1
artifact=${2:-artifact}
mmer=${MMER:-mmer}
read -r -a merge_args <<< "${MMER_MERGE_ARGS:-}"

if [[ -e "$artifact/merged" ]]; then
    echo "::error::$artifact/merged already exists; give a fresh artifact directory" >&2
    exit 2
fi
mkdir -p "$artifact/reports"

# Run one mmer step with --json into reports/NAME.json; on failure print mmer's error and fix as a CI annotation
# and exit with mmer's own code.
step() {
    local name=$1
    shift
    local rc=0
    "$mmer" "$@" --json > "$artifact/reports/$name.json" || rc=$?
    if [[ $rc -ne 0 ]]; then
        local kind="runtime failure"
        [[ $rc -eq 2 ]] && kind="usage error (fix the recipe or the command)"
        [[ $rc -eq 130 ]] && kind="cancelled"
        echo "::error title=mmer $name failed ($kind, exit $rc)::$(tr '\n' ' ' < "$artifact/reports/$name.json")" >&2
        exit "$rc"
    fi
}

step merge merge "$recipe" -o "$artifact/merged" --quiet ${merge_args[@]+"${merge_args[@]}"}
verify_args=()
[[ "${VERIFY_SOURCES:-0}" == "1" ]] && verify_args+=(--sources)
step verify verify "$artifact/merged" ${verify_args[@]+"${verify_args[@]}"}

(cd "$artifact/merged" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) > "$artifact/SHA256SUMS"
echo "merged and verified: $artifact/merged ($(wc -l < "$artifact/SHA256SUMS") files)"
