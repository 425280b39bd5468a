"""distillkit refuses a missing or stale compiled extension with a clear ImportError."""
import subprocess
import sys

import pytest


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("setup,expected", [
    # A _C built against another torch release.
    ("import torch; torch.__version__ = '0.0.1'", "built against torch"),
    # No _C at all (never built): importing it fails.
    ("import sys; sys.modules['distillkit._C'] = None", "could not be loaded"),
])
def test_import_error_says_what_and_how(setup, expected):
    out = run_python(f"{setup}\nimport distillkit")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and expected in out.stderr
    assert "pip install --no-build-isolation -e ." in out.stderr
