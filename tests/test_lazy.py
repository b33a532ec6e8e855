"""Lazy package exports (upcycle._lazy): the public names resolve as before, whatever the import order."""

from __future__ import annotations

import subprocess
import sys

from tests.clitools import subprocess_env

CHECK = """
import sys, types
import upcycle                                        # outside the command line: registers at once
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "moe_gpt2" in CONFIG_MAPPING and "moe_llama" in CONFIG_MAPPING
import upcycle.upcycling.convert                      # the submodule first...
from upcycle.upcycling import convert, UpcycleConfig  # ...the package name is still the function
assert isinstance(convert, types.FunctionType), convert
import upcycle.upcycling as pkg
assert pkg.convert is convert and "UpcycleConfig" in dir(pkg)
from upcycle.moe import MoE, bank                     # a class and a submodule
from upcycle.training import PretrainConfig
from upcycle.models import MoEGPT2Config
try:
    from upcycle.moe import NoSuchName
except ImportError:
    pass
else:
    raise AssertionError("unknown names must fail")
"""

LIGHT = """
import sys
from upcycle.training.config import PretrainConfig
from upcycle.upcycling.options import UpcycleConfig
from upcycle.models.presets import PRESETS
from upcycle.models.loading import model_source
heavy = [m for m in ("torch", "transformers", "datasets") if m in sys.modules]
assert not heavy, heavy
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def test_import_registers_and_exports_resolve_whatever_the_import_order():
    result = _python(CHECK)
    assert result.returncode == 0, result.stderr


def test_option_modules_import_without_torch():
    # `import upcycle` registers the model types (torch) outside the command line; these modules are
    # what the command line imports, so check them below a package that does not.
    result = _python("import sys; sys.argv = ['upcycle']\n" + LIGHT)
    assert result.returncode == 0, result.stderr
