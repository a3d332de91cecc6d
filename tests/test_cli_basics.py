import subprocess
import sys


def test_import_is_cheap_and_side_effect_free():
    code = ("import sys, pascaline; assert 'diffusers' not in sys.modules; "
            "assert 'torch' not in sys.modules, 'import pascaline must not import torch'; "
            "print(pascaline.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __import__("pascaline").__version__


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "pascaline", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "pascaline" in out.stdout
