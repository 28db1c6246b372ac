# shellcheck shell=bash
# Assertions shared by the release tests. Every failure prints what was expected, what came
# out, and exits non-zero: these run in CI, where a quiet pass-by is worse than a loud stop.

T_NAME=${T_NAME:-release}
T_CHECKS=0

fail() {
  printf '\n[%s] FAIL: %s\n' "$T_NAME" "$*" >&2
  exit 1
}
ok() {
  T_CHECKS=$((T_CHECKS + 1))
  printf '[%s] ok: %s\n' "$T_NAME" "$*"
}
section() { printf '[%s] --- %s\n' "$T_NAME" "$*"; }

# run_ok <what> <cmd...>: the command succeeds; its combined output is kept in $OUT.
run_ok() {
  local what=$1; shift
  if ! OUT=$("$@" 2>&1); then
    fail "$what: \`$*\` failed:"$'\n'"$OUT"
  fi
  ok "$what"
}

# run_fails <what> <needle> <cmd...>: the command fails and says <needle> (on stdout or stderr).
run_fails() {
  local what=$1 needle=$2; shift 2
  if OUT=$("$@" 2>&1); then
    fail "$what: \`$*\` succeeded but should have failed:"$'\n'"$OUT"
  fi
  grep -qF -- "$needle" <<<"$OUT" ||
    fail "$what: the error does not say \"$needle\":"$'\n'"$OUT"
  ok "$what"
}

# contains <what> <needle> <text>
contains() {
  grep -qF -- "$2" <<<"$3" || fail "$1: expected \"$2\" in:"$'\n'"$3"
  ok "$1"
}

# equal <what> <expected> <actual>
equal() {
  [ "$2" = "$3" ] || fail "$1: expected [$2], got [$3]"
  ok "$1"
}

# mode <path> <octal>: permission bits of a file, not following symlinks.
mode() {
  local m
  m=$(stat -c %a "$1" 2>/dev/null) || fail "$1 does not exist"
  [ "$m" = "$2" ] || fail "$1 has mode $m, expected $2"
  ok "$1 mode $2"
}

# same_file <what> <a> <b>: byte-identical.
same_file() {
  cmp -s "$2" "$3" || fail "$1: $2 and $3 differ"
  ok "$1"
}

absent() {
  if [ -e "$1" ] || [ -L "$1" ]; then fail "$1 should not exist"; fi
  ok "$1 absent"
}
