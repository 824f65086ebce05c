#!/usr/bin/env bash
# Runs mixtral-train on every worker of an existing Cloud TPU VM slice, from a workstation.
#
# Usage: launch/tpu_vm.sh --name=NAME --zone=ZONE [--project=PROJECT] [--code=copy|git]
#            [--git_url=URL] [--git_ref=REF] [--remote_dir=~/mixtral_jax] [--dry-run]
#            -- <mixtral-train flags, including --workdir=gs://BUCKET/RUN>
#
#   --code=copy  (default) sends this checkout's HEAD (`git archive`: committed files only) to
#                every worker and unpacks it into --remote_dir.
#   --code=git   fetches --git_ref (default: this checkout's HEAD commit, which must be pushed)
#                from --git_url (default: this checkout's origin) into --remote_dir on every worker.
#   --sweep      runs mixtral-sweep instead (flags after -- are its own): a config sweep whose
#                every trial trains on the whole slice. Its --workdir must be a file system
#                every worker mounts (e.g. Filestore over NFS), not gs://.
#   --dry-run    prints each command (shell-quoted, after "+ ") and runs nothing.
#
# Then every worker runs `make install EXTRAS=tpu` and `.venv/bin/mixtral-train --distributed=yes
# <flags>`. The workdir must be storage all workers share (gs://...).
# Exit status: 2 for a bad command line, else that of the first command that fails (gcloud passes
# on a worker's non-zero exit status: 143 after a preemption's checkpoint; rerun to resume).

# shellcheck disable=SC2088  # each quoted ~ here is for a worker's shell to expand
set -euo pipefail

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
warn() { echo "tpu_vm.sh: warning: $*" >&2; }

# Single-quotes a word unless no shell gives any of its characters a meaning.
quote() {
  if [[ $1 =~ ^[[:alnum:]_./:=@,+%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

quote_words() {
  local word quoted=()
  for word in "$@"; do quoted+=("$(quote "$word")"); done
  printf '%s' "${quoted[*]}"
}

# A leading ~ stays unquoted so that the worker's shell expands it to the worker's home.
remote_path() {
  case $1 in
    '~') printf '~' ;;
    '~/'*) printf '~/%s' "$(quote "${1#'~/'}")" ;;
    *) quote "$1" ;;
  esac
}

# Prints the command as it could be typed (a log of what ran), then runs it unless --dry-run.
run() {
  echo "+ $(quote_words "$@")"
  (( dry_run )) || "$@"
}

on_workers() { run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --command "$1"; }

parse_args() {
  while (( $# )); do
    case $1 in
      --name=*) name=${1#*=} ;;
      --zone=*) zone=${1#*=} ;;
      --project=*) project=${1#*=} ;;
      --code=copy | --code=git) code=${1#*=} ;;
      --code=*) die "--code must be copy or git, not ${1#*=}" ;;
      --git_url=*) git_url=${1#*=} ;;
      --git_ref=*) git_ref=${1#*=} ;;
      --remote_dir=*) remote_dir=${1#*=} ;;
      --sweep) program=mixtral-sweep ;;
      --dry-run) dry_run=1 ;;
      -h | --help) usage; exit 0 ;;
      --) shift; train_flags=("$@"); return ;;
      *) die "unknown option $1 (mixtral-train flags go after --; see --help)" ;;
    esac
    shift
  done
}

# Every worker reads and writes the same checkpoints, so the workdir must be one they all see.
check_workdir() {
  local flag workdir=
  for flag in "${train_flags[@]}"; do
    case $flag in --workdir=*) workdir=${flag#--workdir=} ;; esac
  done
  [[ -n $workdir ]] || die "no --workdir= among the mixtral-train flags: add --workdir=gs://BUCKET/RUN after --"
  if [[ $program == mixtral-sweep ]]; then
    [[ $workdir == /* ]] || die "--sweep: --workdir=$workdir must be an absolute path on a file system every worker mounts (a sweep's locks and study need one; gs:// is not supported)"
  fi
  [[ $workdir == gs://* || $workdir == /* ]] ||
    warn "--workdir=$workdir is neither gs:// nor absolute: each worker would write its own copy under $remote_dir"
}

check_args() {
  [[ -n $name ]] || die "missing --name=NAME (the TPU VM)"
  [[ -n $zone ]] || die "missing --zone=ZONE"
  check_workdir
  if [[ $code == git ]]; then
    [[ -n $git_url ]] || git_url=$(git -C "$repo" remote get-url origin 2>/dev/null) ||
      die "--code=git needs --git_url=URL: this checkout has no origin remote"
    [[ -n $git_ref ]] || git_ref=$(git -C "$repo" rev-parse HEAD)
  elif [[ -n $git_url$git_ref ]]; then
    die "--git_url and --git_ref need --code=git"
  fi
}

# One tarball, unpacked over the previous copy: the worker's .venv stays and is reused.
send_checkout() {
  git -C "$repo" diff --quiet HEAD -- || warn "uncommitted changes are not sent (--code=copy sends HEAD)"
  tmp=$(mktemp -d)
  trap 'rm -rf -- "$tmp"' EXIT
  run git -C "$repo" archive --format=tar.gz --output="$tmp/mixtral_jax.tar.gz" HEAD
  run gcloud compute tpus tpu-vm scp "$tmp/mixtral_jax.tar.gz" "$name:" "${where[@]}"
  on_workers "mkdir -p $dir && tar -xzf mixtral_jax.tar.gz -C $dir && rm mixtral_jax.tar.gz"
}

# Fetching the ref by URL (not origin's branches) works for a fresh directory and an old clone
# alike, and for a branch, tag or commit.
fetch_checkout() {
  on_workers "mkdir -p $dir && cd $dir && git init -q && git fetch $(quote_words "$git_url" "$git_ref") && git checkout --detach FETCH_HEAD"
}

run_training() {
  on_workers "cd $dir && make install EXTRAS=tpu && .venv/bin/$program --distributed=yes $(quote_words "${train_flags[@]}")"
}

main() {
  name='' zone='' project='' code=copy git_url='' git_ref='' dry_run=0 program=mixtral-train
  remote_dir='~/mixtral_jax'
  train_flags=()
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  parse_args "$@"
  check_args
  where=(--zone="$zone" --worker=all)
  if [[ -n $project ]]; then where+=(--project="$project"); fi
  dir=$(remote_path "$remote_dir")
  if [[ $code == copy ]]; then send_checkout; else fetch_checkout; fi
  run_training
}

main "$@"
