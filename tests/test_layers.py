"""The layering (#11 §2): data flows shards -> datamodule -> model -> callbacks -> files, with no import back up.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import cannot hide an edge."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLI_LAYER = ("vidgen.cli", "vidgen.runtime", "vidgen.parallel", "vidgen.media", "vidgen.demo", "vidgen.demos",
             "vidgen.predict", "vidgen.shards", "vidgen.tokenize", "vidgen.fvd", "vidgen.convert_i3d",
             "vidgen.checkpoint_tools")
RULES = {
    # folder: imports it must not make
    "datamodules": CLI_LAYER + ("vidgen.lightning_modules", "vidgen.callbacks"),
    "lightning_modules": CLI_LAYER + ("vidgen.callbacks", "vidgen.datamodules"),
    "lightning_modules/nn": CLI_LAYER + ("vidgen.callbacks", "vidgen.datamodules", "vidgen.lightning_modules.magvit",
                                         "vidgen.lightning_modules.latte", "vidgen.lightning_modules.video_tokenizer",
                                         "vidgen.lightning_modules.stream_probe", "lightning"),
    "callbacks": CLI_LAYER,
}


def _package(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return "vidgen." + rel if not rel.startswith("vidgen.") else rel


def imports_of(path: str) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    pkg = _package(path).rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _files(folder: str, recursive: bool):
    top = os.path.join(ROOT, folder)
    for d, _, names in os.walk(top):
        if not recursive and d != top:
            continue
        for n in names:
            if n.endswith(".py"):
                yield os.path.join(d, n)


@pytest.mark.parametrize("folder", sorted(RULES))
def test_no_import_back_up(folder):
    banned = RULES[folder]
    bad = []
    for f in _files(folder, recursive=folder != "lightning_modules"):
        for mod in imports_of(f):
            hit = [b for b in banned if mod == b or mod.startswith(b + ".")]
            if hit:
                bad.append(f"{os.path.relpath(f, ROOT)} imports {mod}")
    assert not bad, "layering broken:\n" + "\n".join(sorted(bad))


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vidgen import media\n    from .nn import vae\n")
    got = imports_of(str(f))
    assert "vidgen.media" in got and any(m.endswith(".nn.vae") for m in got)


def test_models_need_no_mixin_for_fsdp():
    """``fsdp_block_classes`` is all a model declares; the strategy does the sharding."""
    from vidgen.lightning_modules.latte import Latte
    from vidgen.lightning_modules.magvit import MaskedVideoTransformer

    for cls in (Latte, MaskedVideoTransformer):
        assert cls.fsdp_block_classes
        assert all(b.__module__.startswith(("vidgen.", "lightning", "torch", "builtins")) for b in cls.__mro__)
        assert "configure_model" not in cls.__dict__
