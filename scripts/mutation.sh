#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (results/mutation/README.md).
#
#   bash scripts/mutation.sh [module ...]    e.g. optimizers/registry.py harness/rundir.py
#   bash scripts/mutation.sh --list          the modules it knows and their tests
#
# Without a module: every module of [tool.mutmut.tests] in pyproject.toml (hours; run it in the
# background). For each module, mutmut mutates that file only, runs the module's test files from
# [tool.mutmut.tests] once to learn which test reaches which function, and then runs, for each
# mutant, only the tests that reached the mutated function. Each module works in its own folder,
# .mutation/<module>/ (mutmut's mutants/ folder inside), so modules can run one after another and a
# re-run only tries mutants whose function changed. At the end of each module it prints
# "<module>: N mutants, K killed, S survived, T timed out, X no tests" and the survivors
# (`cd .mutation/<module> && ../venv/bin/mutmut show <name>` shows one as a diff).
#
# mutmut is pinned here and installed into .mutation/venv, a virtual environment layered over the
# project's .venv (made by scripts/setup_env.sh): the tests see the project's packages, and the
# project's environment never gets mutmut's. Environment: MUTMUT_JOBS (mutants tested at once,
# default: the number of cores), MUTMUT_NAMES (mutant names or globs, e.g. 'optimizers.registry.x_build*':
# try only these, again even when a result is kept; after a new test), PYTHON (default .venv/bin/python).
# Not part of .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MUTMUT_VERSION="3.8.1"
PROJECT_PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
STATE="$ROOT/.mutation"
TOOLS="$STATE/venv"
JOBS="${MUTMUT_JOBS:-$(nproc)}"

if [ ! -x "$PROJECT_PYTHON" ]; then
  echo "error: $PROJECT_PYTHON not found; run 'bash scripts/setup_env.sh' first" >&2
  exit 2
fi

# The modules and their tests, from pyproject.toml ([tool.mutmut.tests]): "module<TAB>test test ...".
table="$("$PROJECT_PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
for module, tests in tomllib.load(open(sys.argv[1], "rb"))["tool"]["mutmut"]["tests"].items():
    print(module, " ".join(tests), sep="\t")
EOF
)"

if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "$table"
  exit 0
fi

# mutmut, pinned, in a venv that sees the project's packages after its own (a .pth file that adds
# the project's site-packages as a site directory, so its own .pth files, the editable install's
# among them, take effect): pip then installs only what the project's environment lacks.
# Checked at every start: a package the project's environment stops providing is installed here then.
if [ "$("$TOOLS/bin/python" -c 'import importlib.metadata as m, mutmut.__main__; print(m.version("mutmut"))' \
        2>/dev/null || true)" != "$MUTMUT_VERSION" ]; then
  echo "Installing mutmut $MUTMUT_VERSION into $TOOLS ..."
  [ -x "$TOOLS/bin/python" ] || "$PROJECT_PYTHON" -m venv "$TOOLS"
  project_site="$("$PROJECT_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  tools_site="$("$TOOLS/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$project_site')" > "$tools_site/zz-project-venv.pth"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "mutmut==$MUTMUT_VERSION"
fi

read -ra names <<< "${MUTMUT_NAMES:-}"  # words, not file globs
modules=("$@")
if [ ${#modules[@]} -eq 0 ]; then
  mapfile -t modules < <(printf '%s\n' "$table" | cut -f1)
fi

# The test files of a module: its own entry, else the entry whose glob (harness/sweep/*) matches it.
tests_of() {
  "$PROJECT_PYTHON" - "$ROOT/pyproject.toml" "$1" <<'EOF'
import fnmatch, sys, tomllib
tests = tomllib.load(open(sys.argv[1], "rb"))["tool"]["mutmut"]["tests"]
module = sys.argv[2]
match = tests.get(module) or next((t for pattern, t in tests.items() if fnmatch.fnmatch(module, pattern)), None)
if match is None:
    sys.exit(f"error: no tests for {module} in [tool.mutmut.tests] of pyproject.toml; valid: {', '.join(tests)}")
print(" ".join(match))
EOF
}

for module in "${modules[@]}"; do
  module="${module#./}"
  if [ ! -f "$ROOT/$module" ] && [ -z "$(compgen -G "$ROOT/$module" || true)" ]; then
    echo "error: $module is not a file of the repository (a path such as optimizers/registry.py)" >&2
    exit 2
  fi
  tests="$(tests_of "$module")"
  work="$STATE/$(printf '%s' "${module%.py}" | tr '/*' '__')"
  mkdir -p "$work"
  # The work folder: links to the sources and tests (mutmut copies them into its mutants/), and a
  # pyproject.toml that is the project's with this module's only_mutate and test selection.
  for item in $("$PROJECT_PYTHON" -c 'import sys, tomllib; c = tomllib.load(open(sys.argv[1], "rb"))["tool"]["mutmut"]
print(" ".join(c["source_paths"] + c["also_copy"] + ["tests"]))' "$ROOT/pyproject.toml"); do
    ln -sfn "$ROOT/$item" "$work/$item"
  done
  "$PROJECT_PYTHON" - "$ROOT/pyproject.toml" "$work/pyproject.toml" "$module" $tests <<'EOF'
import json, sys
source, target, module, *tests = sys.argv[1:]
lines = open(source).read().splitlines(keepends=True)
at = lines.index("[tool.mutmut]\n") + 1
lines[at:at] = [f"only_mutate = {json.dumps([module])}\n",
                f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"]
open(target, "w").write("".join(lines))
EOF
  echo "== $module: tests $tests"
  start=$(date +%s)
  (cd "$work" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline MPLBACKEND=Agg \
     PYTHONHASHSEED=0 "$TOOLS/bin/mutmut" run --max-children "$JOBS" "${names[@]}")
  (cd "$work" && "$TOOLS/bin/mutmut" export-cicd-stats >/dev/null && "$TOOLS/bin/python" - "$module" $(( $(date +%s) - start )) <<'EOF'
import json, sys
s = json.load(open("mutants/mutmut-cicd-stats.json"))
print(f"{sys.argv[1]}: {s['total']} mutants, {s['killed']} killed, {s['survived']} survived, "
      f"{s['timeout']} timed out, {s['no_tests']} no tests, {s['suspicious']} suspicious, "
      f"{s['segfault']} crashed ({int(sys.argv[2]) // 60} min)")
EOF
  echo "survivors and mutants no test reached:"
  "$TOOLS/bin/mutmut" results | grep -v ": killed$" || true)
done
