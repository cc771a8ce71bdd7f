# Which Pythons weightbundle supports, and where to find them. Sourced by tools/setup.sh
# and .ci/run; keep SUPPORTED_PYTHONS in step with the README's first paragraph.
#
# Why not others (measured; README "Python versions", pyproject's bounds): Triton 2.51's python
# backend stub reads arrays with the numpy 1 ABI, and numpy 1 has no wheels for Python 3.13;
# Python 3.9's newest onnxruntime (1.19) cannot load the weight store's external data (needs 1.21).
SUPPORTED_PYTHONS="3.10 3.11 3.12"

# python_version CMD: prints X.Y.Z if CMD runs as a Python interpreter, else nothing (status 1).
python_version() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

# python_supported CMD: status 0 if CMD is a runnable Python of a supported minor version.
python_supported() {
  local v
  v=$(python_version "$1") || return 1
  case " $SUPPORTED_PYTHONS " in *" ${v%.*} "*) return 0 ;; esac
  return 1
}

# python_candidates [MINORS [all]]: interpreters on this machine, best first (python3 unless
# MINORS is given or "all" is, then the newest minor): PATH, pyenv, the usual prefixes.
# One path per line, duplicates (same real file) removed.
python_candidates() {
  local want=${1:-} minors m c r seen=" "
  minors=${want:-$(echo "$SUPPORTED_PYTHONS" | tr ' ' '\n' | sort -t. -k2,2nr | tr '\n' ' ')}
  {
    if [ -z "$want" ] || [ "${2:-}" = all ]; then command -v python3 || true; fi
    for m in $minors; do
      command -v "python$m" || true
      for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$m".*/bin/python /usr/local/bin/python"$m" /usr/bin/python"$m" \
               /opt/python"$m"*/bin/python"$m" /opt/homebrew/bin/python"$m"; do
        [ -x "$c" ] && echo "$c"
      done
    done
  } 2>/dev/null | while read -r c; do
    r=$(readlink -f "$c" 2>/dev/null || echo "$c")
    case "$seen" in *" $r "*) continue ;; esac
    seen="$seen$r "
    echo "$c"
  done
}

# find_python [X.Y]: the first supported candidate (of minor X.Y when given); status 1 if none.
find_python() {
  local c
  while read -r c; do
    if python_supported "$c" && { [ -z "${1:-}" ] || [ "$(python_version "$c" | cut -d. -f1,2)" = "$1" ]; }; then
      echo "$c"
      return 0
    fi
  done < <(python_candidates "${1:-}")
  return 1
}

# describe_pythons: "3.13.0 (/usr/bin/python3), 3.9.18 (...)" for the messages: every runnable one found.
describe_pythons() {
  local c out=""
  while read -r c; do
    v=$(python_version "$c") || continue
    out="$out${out:+, }$v ($c)"
  done < <(python_candidates "3.8 3.9 3.10 3.11 3.12 3.13 3.14" all)
  echo "${out:-none}"
}
