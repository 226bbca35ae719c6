"""apd_lens's modules import each other without circles (scripts/import_graph.py), and the script
finds a circle when there is one."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "import_graph.py"


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_apd_lens_has_no_import_cycle():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 cycle(s)" in run.stdout


def test_script_finds_cycles_written_any_way(tmp_path):
    """A TYPE_CHECKING import, a relative import and a deferred import inside a function all count;
    an import of the top-level package (for ``__version__``) does not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import B\nA = 1\n"
    )
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import A\nB = 2\n")
    (pkg / "c.py").write_text("def f():\n    from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.c\nfrom pkg import __version__\n")
    graph_tool = _load_script()
    graph = graph_tool.import_graph("pkg", tmp_path)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.d"}
    assert graph["pkg.d"] == {"pkg.c"}
    assert graph["pkg"] == {"pkg.a"}
    assert graph_tool.cycles(graph) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
    assert graph_tool.cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []
