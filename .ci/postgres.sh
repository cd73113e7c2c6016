# Sourced by .ci/run: start a throwaway PostgreSQL on 127.0.0.1 for the store's test suite
# and export OPENLORA_TEST_PG_URL. Never fails the caller (which runs with set -euo pipefail):
# everything runs inside a function called with `|| true`, and on any problem the variable
# stays unset, so the PostgreSQL tests skip with a reason. The server is left running; it
# lives in a temp dir and dies with the CI machine.

_openlora_pg_start() {
  local bindir="" dir port
  if [ -n "${OPENLORA_TEST_PG_URL:-}" ]; then return 0; fi
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    bindir="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
  else
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  fi
  if [ -z "$bindir" ] || [ ! -x "$bindir/pg_ctl" ] || [ ! -x "$bindir/initdb" ] || [ ! -x "$bindir/createdb" ]; then
    echo "postgres.sh: no PostgreSQL server binaries found" >&2; return 1
  fi
  dir="$(mktemp -d /tmp/openlora-pg.XXXXXX)" || return 1
  chmod 755 "$dir" || return 1
  _pg_user=""
  if [ "$(id -u)" = "0" ]; then
    # PostgreSQL refuses to run as root: use (or make) the postgres system user
    _pg_user=postgres
    if ! id "$_pg_user" >/dev/null 2>&1; then
      useradd --system --no-create-home --shell /usr/sbin/nologin "$_pg_user" >/dev/null 2>&1 || return 1
    fi
    chown "$_pg_user" "$dir" || return 1
  fi
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null)" \
    || port=$((20000 + RANDOM % 20000))
  _pg() {  # run a command as the cluster's owner
    if [ -z "$_pg_user" ]; then "$@"
    elif command -v runuser >/dev/null 2>&1; then runuser -u "$_pg_user" -- "$@"
    else su -s /bin/sh "$_pg_user" -c "$(printf '%q ' "$@")"; fi
  }
  _pg "$bindir/initdb" -D "$dir/data" -U openlora --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
    || { echo "postgres.sh: initdb failed (see $dir/initdb.log)" >&2; return 1; }
  # fsync off: a throwaway test cluster; unix socket in $dir (no /var/run/postgresql needed)
  _pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null 2>&1 \
    || { echo "postgres.sh: server did not start (see $dir/server.log)" >&2; return 1; }
  _pg "$bindir/createdb" -h 127.0.0.1 -p "$port" -U openlora openlora_test >/dev/null 2>&1 \
    || { echo "postgres.sh: createdb failed" >&2; _pg "$bindir/pg_ctl" -D "$dir/data" stop -m fast >/dev/null 2>&1; return 1; }
  export OPENLORA_TEST_PG_URL="postgresql+psycopg://openlora@127.0.0.1:$port/openlora_test"
  echo "postgres.sh: PostgreSQL ($bindir) on 127.0.0.1:$port, data in $dir" >&2
}

_openlora_pg_start || echo "postgres.sh: PostgreSQL not started; the store's PostgreSQL tests will skip" >&2
unset -f _openlora_pg_start _pg 2>/dev/null || true
unset _pg_user 2>/dev/null || true
