#!/usr/bin/env bash
# Installs the peer libraries into their own virtual environments under bench/.venvs/ (gitignored)
# and makes sure redis-server is on PATH. Two environments, because Celery 5.7 needs
# redis-py >= 6.1 while arq pins redis-py < 6. backroom itself runs from the interpreter that
# runs bench/run.py (the project's own environment). Safe to re-run: existing envs are reused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
venvs="$here/.venvs"
mkdir -p "$venvs"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "bench/setup.sh: installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server
    else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi
fi

make_env() {  # make_env NAME PACKAGE...
    local name="$1"; shift
    if [ ! -x "$venvs/$name/bin/python" ]; then
        "$python" -m venv "$venvs/$name"
    fi
    "$venvs/$name/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

# Three environments, because the peers disagree on redis-py: Celery 5.7 (kombu) needs >= 6.4,
# saq < 8, arq < 6, and taskiq-redis 1.2.4 needs >= 8 (1.2.2, on redis-py 7, does not import
# with taskiq 0.13).
make_env peers \
    "huey==3.5.4" "dramatiq[redis]==2.2.1" "rq==3.0.0" "saq==0.26.4" "celery[redis]==5.7.0" \
    "redis>=7,<8"
make_env taskiq "taskiq==0.13.0" "taskiq-redis==1.2.4"
make_env arq "arq==0.28.0" "redis<6"
# profilers for the backroom hot-path profiles (bench/hotpaths.py), into the project's env
"$python" -m pip install -q --disable-pip-version-check "py-spy==0.4.3" "pyinstrument==5.1.3"

echo "bench/setup.sh: ready ($venvs)"
