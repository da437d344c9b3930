"""The next-release canary of `.ci/run`: is there a release of the capped stack above setup.cfg's caps, and what did
the suite say on it.

    python .ci/next_release.py plan setup.cfg [NAME ...]
        asks the registry (`pip index versions NAME`) for the newest release of each NAME (by default CANARY_NAMES) and
        prints, one a line, `NAME==NEWEST` for each newest release above setup.cfg's cap for NAME; when there is none it
        prints nothing and writes the skip line (`NEXT-RELEASE CANARY: skipped (no release above the caps: ...)`) to
        stderr. Always exits 0: the canary never blocks.
    python .ci/next_release.py report FAILURES_FILE PYTEST_STATUS TIME_LIMIT
        prints `NEXT-RELEASE CANARY: N failed` and the failing test ids, from the file that this module, loaded into
        pytest as a plugin (`PYTHONPATH=.ci pytest -p next_release`, NEXT_RELEASE_FAILURES=FILE), fills as tests fail:
        the ids survive a run that the time limit kills.

Needs only the standard library and `packaging` (which pip vendors, so any virtual environment has it).
"""

import configparser
import os
import re
import subprocess
import sys


try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import InvalidVersion, Version


CANARY_NAMES = ("transformers", "diffusers", "accelerate", "peft", "trl")
PREFIX = "NEXT-RELEASE CANARY:"
UPPER_OPERATORS = ("<", "<=", "==", "~=")  # the specifiers that bound a range from above


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_caps(setup_cfg: str, names=CANARY_NAMES) -> dict[str, SpecifierSet | None]:
    """The upper bound of each of `names` in [options] install_requires of setup.cfg's text (None: not capped,
    KeyError: not required at all)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(setup_cfg)
    caps = {}
    for line in parser.get("options", "install_requires", fallback="").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        upper = [str(s) for s in requirement.specifier if s.operator in UPPER_OPERATORS]
        caps[canonical(requirement.name)] = SpecifierSet(",".join(upper)) if upper else None
    missing = [name for name in names if canonical(name) not in caps]
    if missing:
        raise KeyError(f"setup.cfg's install_requires has no {', '.join(missing)}")
    return {name: caps[canonical(name)] for name in names}


def parse_index_versions(output: str, name: str) -> Version | None:
    """The newest version in the output of `pip index versions NAME` (None when it names none)."""
    candidates = [version for heading, version in re.findall(r"^(\S+) \(([^)]+)\)$", output, re.MULTILINE)
                  if canonical(heading) == canonical(name)]  # fmt: skip
    listed = re.search(r"^Available versions: (.+)$", output, re.MULTILINE)
    if listed:
        candidates += [v.strip() for v in listed.group(1).split(",")]
    versions = []
    for candidate in candidates:
        try:
            versions.append(Version(candidate))
        except InvalidVersion:
            pass
    return max(versions, default=None)


def above_cap(version: Version, cap: SpecifierSet | None) -> bool:
    """Whether `cap` excludes `version` from above (an uncapped name never is above its cap)."""
    return cap is not None and any(_excludes_from_above(specifier, version) for specifier in cap)


def _excludes_from_above(specifier, version: Version) -> bool:
    if specifier.contains(version, prereleases=True):
        return False
    bound = Version(specifier.version.removesuffix(".*"))
    return version >= bound if specifier.operator == "<" else version > bound


def plan(caps: dict, newest: dict) -> list[str]:
    """`NAME==NEWEST` for each name whose newest release is above its cap, in the order of `caps`."""
    return [f"{name}=={newest[name]}" for name, cap in caps.items() if newest.get(name) is not None
            and above_cap(newest[name], cap)]  # fmt: skip


def skip_line(caps: dict, newest: dict) -> str:
    parts = []
    for name, cap in caps.items():
        found = "not found" if newest.get(name) is None else str(newest[name])
        parts.append(f"{name} {found} {cap if cap is not None else '(no cap)'}")
    return f"{PREFIX} skipped (no release above the caps: {', '.join(parts)})"


def newest_release(name: str) -> Version | None:
    """The newest release of `name` the registry offers this Python (pip's own choice of index and compatibility)."""
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"pip index versions {name}: {error}", file=sys.stderr)
        return None
    version = parse_index_versions(result.stdout, name)
    if version is None:
        print(f"pip index versions {name} (status {result.returncode}): {result.stderr.strip()[-500:]}", file=sys.stderr)
    return version


def report(failures: list[str], status: int, time_limit: int) -> list[str]:
    """The canary's lines: `NEXT-RELEASE CANARY: N failed`, the failing ids, then why the run stopped when that was
    not pytest's own verdict (0: all passed, 1: some failed)."""
    ids = list(dict.fromkeys(failures))
    lines = [f"{PREFIX} {len(ids)} failed", *ids]
    if status in (124, 137):
        lines.append(f"(stopped at the time limit of {time_limit} s: the tests after that did not run)")
    elif status not in (0, 1):
        lines.append(f"(pytest exited with status {status}: see its output above)")
    return lines


# --- the pytest plugin: `-p next_release` with .ci on PYTHONPATH and NEXT_RELEASE_FAILURES naming a file --------------


def _record(nodeid: str) -> None:
    path = os.environ.get("NEXT_RELEASE_FAILURES")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(nodeid + "\n")


def pytest_runtest_logreport(report):
    if report.failed:  # a failing call, or an error in setup or teardown
        _record(report.nodeid)


def pytest_collectreport(report):
    if report.failed:  # a test file that does not even import
        _record(report.nodeid or "(collection)")


def main(argv: list[str]) -> int:
    if argv[:1] == ["plan"] and len(argv) >= 2:
        with open(argv[1], encoding="utf-8") as file:
            caps = parse_caps(file.read(), tuple(argv[2:]) or CANARY_NAMES)
        newest = {name: newest_release(name) for name in caps}
        pins = plan(caps, newest)
        if pins:
            print("\n".join(pins))
        else:
            print(skip_line(caps, newest), file=sys.stderr)
        return 0
    if argv[:1] == ["report"] and len(argv) == 4:
        failures = []
        if os.path.isfile(argv[1]):
            with open(argv[1], encoding="utf-8") as file:
                failures = [line.rstrip("\n") for line in file if line.strip()]
        print("\n".join(report(failures, int(argv[2]), int(argv[3]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
