#!/usr/bin/env bash
# Render every experiment's figures and tables, and an index of them.
#
#   bash scripts/figures.sh            # keeps every report built from more (or other) runs than it has
#   bash scripts/figures.sh --force    # replaces them
#
# - runs/<exp>/ (any folder of runs/ but sweeps/ and robustness/ holding a summary.json):
#   python -m harness.report runs/<exp> --out results/<exp>   (curves per optimizer, results.md)
# - runs/robustness/<exp>/: results/robustness/<exp>/robustness.png and robustness.md
# - runs/sweeps/<exp>/<optimizer>/study.db: results/sweeps/<exp>/<optimizer>/ (history, importances, study.md)
# - results/README.md: an index linking every table and figure under results/.
# RUNS and RESULTS override the folders (default runs and results).
# A report or robustness table already there is replaced only by one built from the same runs or
# from more (harness/README.md, "What a tool may write over"); otherwise it is kept, with a warning
# naming --force: one smoke run under runs/nano never replaces the committed results/nano/.
set -euo pipefail
FORCE=()
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=(--force) ;;
    *) echo "usage: bash scripts/figures.sh [--force]; unknown argument $arg" >&2; exit 2 ;;
  esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/python.sh
RUNS="${RUNS:-runs}"
RESULTS="${RESULTS:-results}"
export MPLBACKEND=Agg
status=0

has_runs() { [ -n "$(find "$1" -name summary.json -print -quit 2>/dev/null)" ]; }
warn() { echo "warning: $*" >&2; status=1; }

rendered=0
for dir in "$RUNS"/*/; do
  [ -d "$dir" ] || continue
  exp="$(basename "$dir")"
  case "$exp" in sweeps|robustness|slurm) continue ;; esac
  has_runs "$dir" || continue
  echo "== $exp: $dir -> $RESULTS/$exp"
  if "$PY" -m harness.report "$dir" --out "$RESULTS/$exp" "${FORCE[@]}" >/dev/null; then
    rendered=$((rendered + 1))
  else
    warn "report of $dir not written (the line above says why)"
  fi
done

for dir in "$RUNS"/robustness/*/; do
  [ -d "$dir" ] || continue
  exp="$(basename "$dir")"
  has_runs "$dir" || continue
  echo "== robustness $exp -> $RESULTS/robustness/$exp"
  if "$PY" -m harness.robustness "$exp" --plot-only --root "$RUNS/robustness" --out "$RESULTS/robustness/$exp" \
      "${FORCE[@]}" >/dev/null; then
    rendered=$((rendered + 1))
  else
    warn "robustness figure of $dir not written (the line above says why)"
  fi
done

for db in "$RUNS"/sweeps/*/*/study.db; do
  [ -f "$db" ] || continue
  opt_dir="$(dirname "$db")"
  opt="$(basename "$opt_dir")"
  exp="$(basename "$(dirname "$opt_dir")")"
  echo "== sweep $exp $opt -> $RESULTS/sweeps/$exp/$opt"
  if "$PY" -m harness.sweep plot "$exp" "$opt" --storage "sqlite:///$(cd "$opt_dir" && pwd)/study.db" \
      --out "$RESULTS/sweeps/$exp/$opt" >/dev/null; then
    rendered=$((rendered + 1))
  else
    warn "sweep figures of $db failed"
  fi
done

if [ "$rendered" -eq 0 ]; then
  echo "no runs under $RUNS/ (run an experiment first, e.g. bash scripts/reproduce.sh nano)" >&2
fi

# The index: one section per folder of results, tables linked first, then the figures.
mkdir -p "$RESULTS"
index="$RESULTS/README.md"
tmp="$RESULTS/.README.md.tmp$$"  # written whole, then renamed over the index
trap 'rm -f "$tmp"' EXIT
{
  echo "# Results"
  echo
  echo "Rendered by \`bash scripts/figures.sh\` from the run directories under \`$RUNS/\`."
  echo "Tables give mean ± std over seeds where there are several."
  find "$RESULTS" -mindepth 2 -type f \( -name '*.md' -o -name '*.png' \) -printf '%h\n' | sort -u |
  while read -r folder; do
    rel="${folder#"$RESULTS"/}"
    echo
    echo "## $rel"
    echo
    find "$folder" -maxdepth 1 -type f -name '*.md' -printf '%f\n' | sort | while read -r f; do
      echo "- [$f]($rel/$f)"
    done
    find "$folder" -maxdepth 1 -type f -name '*.png' -printf '%f\n' | sort | while read -r f; do
      echo
      echo "![$rel/${f%.png}]($rel/$f)"
    done
  done
} > "$tmp"
mv -f "$tmp" "$index"
echo "$index"
exit "$status"
