"""The top-level folders install under the vidgen namespace only (vidgen.callbacks, ...), never as `callbacks`."""
import os
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPED = {"callbacks": "vidgen.callbacks", "datamodules": "vidgen.datamodules",
          "lightning_modules": "vidgen.lightning_modules", "vidgen": "vidgen"}


def test_every_package_is_listed_under_the_namespace():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        st = tomllib.load(f)["tool"]["setuptools"]
    assert st["package-dir"] == {v: k for k, v in MAPPED.items()}
    found = set()
    for top, name in MAPPED.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert set(st["packages"]) == found, "pyproject.toml [tool.setuptools] packages must list every package"


def test_namespaced_import_registers_no_top_level_names():
    code = ("import sys, vidgen.callbacks.ema, vidgen.datamodules, vidgen.lightning_modules.nn.attention as a;"
            "assert a.__name__ == 'vidgen.lightning_modules.nn.attention', a.__name__;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('callbacks', 'datamodules', 'lightning_modules')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.join(ROOT, "tests"),
                   env=dict(os.environ, PYTHONPATH=ROOT))


def test_make_targets_cache_bytecode_in_the_venv(tmp_path):
    """`make demo` / `make test` run Python with bytecode written once under .venv/pycache, even where the environment
    sets PYTHONDONTWRITEBYTECODE: otherwise every stage and CLI process compiles torch + lightning again."""
    probe = tmp_path / "probe.mk"
    probe.write_text(f"include {os.path.join(ROOT, 'Makefile')}\nshow:\n\t@{sys.executable} -c "
                     "\"import sys; print(sys.dont_write_bytecode, sys.pycache_prefix)\"\n")
    out = subprocess.run(["make", "-s", "--no-print-directory", "-f", str(probe), "show"], cwd=ROOT, check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1")).stdout
    assert out.split() == ["False", os.path.join(ROOT, ".venv", "pycache")]
