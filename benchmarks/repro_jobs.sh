#!/usr/bin/env bash
# The smoke study on fresh clones of HEAD: sequential `dvc repro` against `transferbench repro --jobs N`
# (what `make repro JOBS=N` runs), one after the other on an otherwise idle machine. Each clone reuses
# this checkout's .venv (run `make venv` first) and gets ../shared beside it, as CI does.
#   benchmarks/repro_jobs.sh [N=2] [OUT=/tmp/repro-jobs]
set -u
jobs=${1:-2}
out=${2:-/tmp/repro-jobs}
src=$(git rev-parse --show-toplevel)
shared=$(cd "$src/../shared" && pwd)
export TRANSFERBENCH_DATA_MIRROR="$shared/datasets" PYTHONUNBUFFERED=1 PATH="$src/.venv/bin:$PATH"
rm -rf "$out"; mkdir -p "$out"
for mode in sequential "jobs$jobs"; do
  d="$out/$mode"; mkdir -p "$d"; git clone -q "$src" "$d/project"; ln -s "$shared" "$d/shared"
  cd "$d/project" && ln -s "$src/.venv" .venv
  transferbench fetch > "$d/fetch.log" 2>&1
  start=$(date +%s)
  if [ "$mode" = sequential ]; then transferbench with-ray -- dvc repro > "$d/repro.log" 2>&1
  else transferbench with-ray -- transferbench repro --jobs "$jobs" > "$d/repro.log" 2>&1; fi
  rc=$?
  echo "$mode: rc=$rc repro=$(( $(date +%s) - start ))s; $(dvc status 2>&1 | tail -1)" | tee -a "$out/summary.txt"
done
