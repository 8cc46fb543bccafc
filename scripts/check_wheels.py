"""Check that every dependency of foldercnn, `[hands]` and `[test]` has a wheel for CPython 3.10-3.13 on Linux,
macOS and Windows: pip resolves the whole set for each (Python, platform) with binary wheels only, from package
metadata (nothing is installed, and pip reads PyPI's metadata files instead of downloading whole wheels).

    python scripts/check_wheels.py            # 12 resolutions in parallel; exit 1 naming any that fails

Run by .ci/run. torch is resolved on its own, without its dependencies: pip evaluates environment markers for
this machine, not the target platform, so torch's Linux-only CUDA packages would be asked for on macOS and
Windows too. On Linux PyPI's torch wheel is the CUDA build; README says how to get the CPU one.
"""

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORMS = {
    "linux x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "macOS arm64": ["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64"],
    "windows x86_64": ["win_amd64"],
}
EXTRAS = ("hands", "test", "lint")


def requirements(pyproject: Path) -> list[str]:
    """The project's dependencies and those of EXTRAS, without its references to itself."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith(project["name"])]
    return sorted(set(reqs))


def dry_run(python: str, platform: str, reqs: list[str], *flags: str) -> str:
    """'ok', or pip's last error line."""
    with tempfile.TemporaryDirectory() as target:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--python-version",
            python,
            "--target",
            target,
            *flags,
        ]
        for tag in PLATFORMS[platform]:
            cmd += ["--platform", tag]
        r = subprocess.run(cmd + reqs, capture_output=True, text=True)
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    return "ok" if r.returncode == 0 else (errors[-1] if errors else r.stderr.strip()[-300:])


def resolve(python: str, platform: str, reqs: list[str]) -> tuple[str, str, str]:
    torch = [r for r in reqs if r.startswith("torch")]
    rest = dry_run(python, platform, [r for r in reqs if r not in torch])
    status = rest if rest != "ok" else dry_run(python, platform, torch, "--no-deps")
    return python, platform, status


def main() -> int:
    reqs = requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")
    jobs = [(py, plat) for py in PYTHONS for plat in PLATFORMS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: resolve(*job, reqs), jobs))
    for python, platform, status in results:
        print(f"CPython {python} {platform}: {status}")
    failed = [r for r in results if r[2] != "ok"]
    print(f"wheels for {len(reqs)} requirements: {len(results) - len(failed)} of {len(results)} resolved")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
