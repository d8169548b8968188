import subprocess
import sys

from tests.conftest import REPO


def test_platform_is_a_source_root_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert (REPO / "platform" / "raylm" / "__init__.py").exists()


def test_standard_library_platform_still_imports_from_the_repo_root():
    code = "import platform, raylm, torch; print(platform.system(), raylm.__version__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in {"Linux", "Darwin", "Windows"}


def test_no_module_shadows_the_standard_library():
    names = {p.stem for folder in ("jobs", "serve", "bench") for p in (REPO / folder).glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def test_job_entry_points_run_the_cli():
    for script in ("prepare_data", "train", "tune", "pipeline"):
        result = subprocess.run(
            [sys.executable, f"jobs/{script}.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert "--config" in result.stdout


def test_test_modules_have_unique_names():
    """The test folders are not packages: pytest imports each test file by its basename, and a second file of the
    same name anywhere under tests/ stops the whole collection."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted(names) == sorted(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
