"""Every tensor the trainer creates is born on a device: a factory call (``torch.zeros``, ``torch.arange``,
``torch.randperm``, ...) in ``pg_lm/lm`` outside the CPU layer, and in ``pg_lm/core``, names ``device=``, or says on its line that it
is host-side on purpose (``# host:``, e.g. a seeded prompt permutation read back as Python ints). On a CPU
a forgotten device cannot fail; on a GPU it fails (a CPU index into a CUDA tensor) or copies every step.
The GPU tests (tests/test_gpu.py) run the paths themselves on CUDA."""

from __future__ import annotations

import ast
from pathlib import Path

LM = Path(__file__).resolve().parents[1] / "pg_lm" / "lm"
CORE = LM.parent / "core"
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "randperm", "rand", "randn", "randint", "tensor",
             "linspace", "eye", "as_tensor"}


def factory_calls_without_device(source: str) -> list[tuple[int, str]]:
    """(line, call) of each ``torch.<factory>(...)`` with no ``device=`` and no ``# host:`` on its line."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
                and not any("# host:" in lines[i - 1] for i in range(node.lineno, (node.end_lineno or node.lineno) + 1))):
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def test_the_check_finds_a_factory_without_a_device():
    src = "import torch\nrows = torch.randperm(8)\nok = torch.arange(4, device=x.device)\nh = torch.ones(2)  # host: ints\n"
    assert factory_calls_without_device(src) == [(2, "torch.randperm(8)")]


def test_factories_in_the_lm_backend_name_their_device():
    files = [p for p in LM.rglob("*.py") if "cpu" not in p.relative_to(LM).parts] + list(CORE.rglob("*.py"))
    assert len(files) > 10
    offenders = [f"{p.relative_to(LM.parents[1])}:{line}: {call}" for p in files
                 for line, call in factory_calls_without_device(p.read_text())]
    assert not offenders, "\n".join(offenders)
