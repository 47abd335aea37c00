# Sourced by the shell entry points (from the repository root, or with ROOT set to it): sets PY to
# the Python that runs the project: $PYTHON if set, else the repository's .venv (made by
# scripts/setup_env.sh), else python3 from PATH (e.g. an activated conda environment).
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "${ROOT:-.}/.venv/bin/python" ]; then PY="${ROOT:-.}/.venv/bin/python"; else PY=python3; fi
fi
