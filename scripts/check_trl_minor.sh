#!/usr/bin/env bash
# Would trl-entropy work on TRL X.Y? One command for a maintainer, before supporting a new TRL minor release.
#
#   scripts/check_trl_minor.sh X.Y            # the newest X.Y.* release of TRL (or X.Y.Z, or a pre-release: 1.17.0rc1)
#   scripts/check_trl_minor.sh X.Y --fresh    # a clean venv with every dependency resolved again, instead of an overlay
#   scripts/check_trl_minor.sh X.Y --keep     # keep the work folder (venv, bumped copy, logs) for a closer look
#
# What it does, touching nothing in this checkout:
#   1. copies the working tree (tracked and untracked files, not the ignored ones) to a throwaway folder, and there
#      bumps the pin as a release would: SUPPORTED_TRL and SUPPORTED_TRL_RANGE in trl_entropy/trainers/_trl.py, the
#      `trl` requirement in pyproject.toml;
#   2. makes a throwaway venv with TRL X.Y: by default an overlay of this project's .venv (the venv's own
#      site-packages first, .venv's after it: TRL X.Y and whatever newer dependency it asks for shadow .venv's, nothing
#      in .venv changes); with --fresh, a venv that installs the bumped copy with its `dev` extra from the index;
#   3. prints `trl-entropy env` there (the versions under test);
#   4. runs the TRL-contract tests (tests/trainers/test_trl_contract.py, tests/trainers/test_dropin.py; TESTS="..." runs other pytest
#      arguments) on the bumped copy;
#   5. runs TRL's own GRPO/RLOO trainer tests (../shared/trl-conformance/run.sh, or $CONFORMANCE) in `base` mode
#      (TRL's classes) and `swap` mode (the entropy trainers under TRL's names), and lists the tests that fail with
#      the entropy trainers only;
#   6. prints a verdict: READY (exit 0) when the contract tests pass and `swap` fails nothing that `base` passes,
#      else NOT READY or INCOMPLETE (exit 1).
#
# The versions the tests name (in expected messages) follow the bump in the copy, as the bump commit would change them.
# Environment: PYTHON (the interpreter the venv is made from; default .venv/bin/python),
# TESTS, CONFORMANCE, CONFORMANCE_TESTS (node ids passed to run.sh; default: its subset), WORK (the work folder).
set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
target=$1; shift
fresh=0; keep=0
for arg in "$@"; do
  case $arg in
    --fresh) fresh=1 ;;
    --keep) keep=1 ;;
    *) echo "check_trl_minor.sh: error: unknown option $arg"; usage ;;
  esac
done
if [[ $target =~ ^([0-9]+)\.([0-9]+)$ ]]; then
  requirement="trl==${target}.*"
elif [[ $target =~ ^([0-9]+)\.([0-9]+)\.[0-9]+[0-9a-z.]*$ ]]; then
  requirement="trl==${target}"
else
  echo "check_trl_minor.sh: error: the TRL version must be X.Y, X.Y.Z or a pre-release such as 1.17.0rc1, got '$target'"
  exit 2
fi
major=${BASH_REMATCH[1]}; minor=${BASH_REMATCH[2]}
pin="${major}.${minor}"; range=">=${pin},<${major}.$((minor + 1))"

root=$(cd "$(dirname "$0")/.." && pwd)
base_python=${PYTHON:-$root/.venv/bin/python}
[ -x "$base_python" ] || { echo "check_trl_minor.sh: error: no python at $base_python (run scripts/setup.sh, or set PYTHON)"; exit 2; }
conformance=${CONFORMANCE:-$root/../shared/trl-conformance/run.sh}
work=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/trl-${pin}-check.XXXXXX")}
mkdir -p "$work"
if [ "$keep" = 0 ]; then trap 'rm -rf "$work"' EXIT; fi
step() { printf '\n== %s\n' "$*"; }

# 1. The bumped copy.
step "copy of $root with the pin bumped to TRL $range ($work/src)"
mkdir -p "$work/src"
old_pin=$(sed -nE 's/^SUPPORTED_TRL = "([0-9]+\.[0-9]+)"$/\1/p' "$root/trl_entropy/trainers/_trl.py")
[ -n "$old_pin" ] || { echo "no SUPPORTED_TRL = \"X.Y\" in trl_entropy/trainers/_trl.py"; exit 1; }
(cd "$root" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
  | tar -xf - -C "$work/src" || { echo "copying the working tree failed"; exit 1; }
sed -i -E "s/^SUPPORTED_TRL = \"[^\"]*\"/SUPPORTED_TRL = \"${pin}\"/; s/^SUPPORTED_TRL_RANGE = \"[^\"]*\"/SUPPORTED_TRL_RANGE = \"${range}\"/" \
  "$work/src/trl_entropy/trainers/_trl.py"
sed -i -E "s/\"trl>=[0-9.]+,<[0-9.]+\"/\"trl${range}\"/" "$work/src/pyproject.toml"
# The tests name the pinned minor in expected messages ("TRL 1\.16's 8 values") and pick "another" version next to it:
# they follow the pin, as the bump would make them (the old minor becomes the new one, the old next minor the new next).
"$base_python" - "$old_pin" "$pin" "$work/src/tests" <<'PYTHON' || { echo "could not bump the versions named in the tests"; exit 1; }
import pathlib, re, sys

old, new, folder = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
following = lambda version: f"{version.split('.')[0]}.{int(version.split('.')[1]) + 1}"
mapping = {old: new, following(old): following(new)}
pattern = re.compile(r"(?<![\d.])(\d+)(\\?\.)(\d+)(?!\d)")

def bump(match):
    version = f"{match.group(1)}.{match.group(3)}"
    if version not in mapping:
        return match.group(0)
    major, minor = mapping[version].split(".")
    return f"{major}{match.group(2)}{minor}"

for path in folder.rglob("*.py"):
    text = path.read_text(encoding="utf-8")
    if pattern.sub(bump, text) != text:
        path.write_text(pattern.sub(bump, text), encoding="utf-8")
PYTHON
grep -q "^SUPPORTED_TRL = \"${pin}\"" "$work/src/trl_entropy/trainers/_trl.py" \
  && grep -q "^SUPPORTED_TRL_RANGE = \"${range}\"" "$work/src/trl_entropy/trainers/_trl.py" \
  && grep -q "\"trl${range}\"" "$work/src/pyproject.toml" \
  || { echo "could not bump the pin: SUPPORTED_TRL / SUPPORTED_TRL_RANGE (trl_entropy/trainers/_trl.py) or the trl requirement (pyproject.toml) changed form"; exit 1; }
echo "SUPPORTED_TRL = \"${pin}\", SUPPORTED_TRL_RANGE = \"${range}\", pyproject.toml: trl${range}; TRL ${old_pin} -> ${pin} in tests/"

# 2. The venv with TRL X.Y.
venv="$work/venv"
if [ "$fresh" = 1 ]; then
  step "fresh venv: pip install the bumped copy [dev] ($requirement)"
  "$base_python" -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip \
    && "$venv/bin/python" -m pip install -q "$work/src[dev]" "$requirement" \
    || { echo "installing TRL $target failed"; exit 1; }
else
  step "overlay venv on $(dirname "$(dirname "$base_python")"): pip install $requirement"
  "$base_python" -m venv --without-pip "$venv" || exit 1
  base_site=$("$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  own_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # After the venv's own site-packages: .venv's packages (and its pip) come second, so anything installed here wins.
  echo "import site; site.addsitedir('$base_site')" > "$own_site/zz_base_venv.pth"
  # The bumped copy as an editable install of the overlay (no dependencies: they are .venv's), so that its metadata
  # (the TRL requirement `trl-entropy env` reports) is the bumped one; then TRL X.Y.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$work/src" \
    > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; echo "installing the bumped copy failed"; exit 1; }
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$requirement" 2>&1 \
    | grep -v "outside environment\|No files were found to uninstall\|Can't uninstall" \
    || true
fi
installed=$(cd "$work" && "$venv/bin/python" -c 'from importlib.metadata import version; print(version("trl"))' 2>/dev/null)
if [[ ! $installed =~ ^${major}\.${minor}(\.|$) ]]; then
  echo "TRL ${pin} is not what the venv imports (it has TRL '${installed:-none}'): does the index have TRL $target?"
  exit 1
fi
py="$venv/bin/python"

# 3. The versions under test.
step "trl-entropy env (the bumped copy on TRL $installed)"
(cd "$work/src" && PYTHONPATH="$work/src" "$py" -m trl_entropy.cli env)

# 4. The TRL-contract tests.
tests=${TESTS:-tests/trainers/test_trl_contract.py tests/trainers/test_dropin.py}
step "contract tests: pytest $tests"
# shellcheck disable=SC2086  # TESTS is a list of pytest arguments
(cd "$work/src" && PYTHONPATH="$work/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$py" -m pytest -q -p no:cacheprovider \
  -W ignore::FutureWarning --tb=line -rf $tests) \
  2>&1 | tee "$work/contract.log" | tail -n 40
contract_status=${PIPESTATUS[0]}
contract_summary=$(grep -E "[0-9]+ (passed|failed)|error" "$work/contract.log" | tail -n 1)

# 5. TRL's own trainer tests, with TRL's classes (base) and the entropy trainers (swap).
conformance_verdict="not run (no $conformance)"
swap_only=""
if [ -x "$conformance" ]; then
  for mode in base swap; do
    step "TRL's trainer tests, $mode mode: $conformance $mode"
    # shellcheck disable=SC2086  # CONFORMANCE_TESTS is a list of node ids
    (cd "$work/src" && PY="$py" "$conformance" "$mode" ${CONFORMANCE_TESTS:-}) > "$work/$mode.log" 2>&1
    tail -n 3 "$work/$mode.log"
    grep -E "^FAILED " "$work/$mode.log" | sed -E 's#^FAILED tests(_swap)?/#FAILED #; s/ - .*//' | sort -u > "$work/$mode.failed"
  done
  swap_only=$(comm -13 "$work/base.failed" "$work/swap.failed")
  base_summary=$(grep -E "[0-9]+ (passed|failed)" "$work/base.log" | tail -n 1)
  swap_summary=$(grep -E "[0-9]+ (passed|failed)" "$work/swap.log" | tail -n 1)
  if [ -z "$base_summary" ] || [ -z "$swap_summary" ]; then
    conformance_verdict="did not run to the end (see the logs above)"
    swap_only=${swap_only:-"(no pytest summary)"}
  elif [ -z "$swap_only" ]; then
    conformance_verdict="swap fails nothing that base passes (base: $base_summary; swap: $swap_summary)"
  else
    conformance_verdict="the entropy trainers fail what TRL's pass (base: $base_summary; swap: $swap_summary)"
  fi
fi

# 6. Verdict.
step "TRL $installed: verdict"
echo "contract tests: ${contract_summary:-no pytest summary} (exit status $contract_status)"
echo "TRL's trainer tests: $conformance_verdict"
[ -z "$swap_only" ] || printf 'failing with the entropy trainers only:\n%s\n' "$swap_only"
[ "$keep" = 1 ] && echo "work folder kept: $work (logs: contract.log, base.log, swap.log)"
if [ "$contract_status" = 0 ] && [ ! -x "$conformance" ]; then
  echo "INCOMPLETE: the contract tests pass; TRL's own trainer tests did not run (CONFORMANCE=path/to/run.sh)."
  exit 1
fi
if [ "$contract_status" = 0 ] && [ -z "$swap_only" ]; then
  echo "READY: support TRL ${pin}: set SUPPORTED_TRL = \"${pin}\" and SUPPORTED_TRL_RANGE = \"${range}\" in"
  echo "trl_entropy/trainers/_trl.py, \"trl${range}\" in pyproject.toml, TRL ${old_pin} -> ${pin} where tests name it,"
  echo "the README's TRL versions section, then run the whole test suite."
  exit 0
fi
echo "NOT READY: TRL ${pin} changes what the trainers rely on; the failures above name the hooks to adapt."
exit 1
