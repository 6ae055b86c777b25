"""A damaged build of the CPU decode kernel never crashes the process: a finished build is
checked (library size and sha256 from its manifest) before it is loaded; a damaged one gives
ONE warning and is built again, or, when that fails, the decode step runs the torch path.
Builds are written in a temporary folder and renamed into place, so an interrupted build
leaves nothing that looks finished.

The tests damage a copy of the machine's build in a temporary build folder
(`KVCOMPRESS_CACHE`); where a test needs a rebuild, the compiler is replaced by a copy of
the intact library (a real compile takes about a minute)."""

import os
import shutil
import warnings

import pytest
import torch

from kvcompress import kernels
from kvcompress.cache.attention import attend
from kvcompress.cache.layer import CompressedLayer
from kvcompress.codecs import QuantCodec
from kvcompress.io import MANIFEST_NAME, TMP_MARK, check_directory
from kvcompress.kernels import cpu
from kvcompress.kernels.reference import attend_compressed


@pytest.fixture(scope="module")
def intact_build():
    """(folder, library) of the machine's checked build (built once per machine, shared with the other kernel tests)."""
    if kernels.mode() == "torch":
        pytest.skip("KVCOMPRESS_KERNELS=torch is set: the kernel is disabled")
    assert cpu.load() is not None, f"the CPU kernel did not build: {cpu.unavailable_reason()}"
    folder = cpu.build_directory()
    library = cpu._library(f"kvcompress_cpu_decode_{cpu.build_key()}", folder)
    manifest = check_directory(folder)
    assert library is not None and set(manifest["sha256"]) == {library.name}, manifest
    return folder, library


@pytest.fixture
def build_copy(intact_build, tmp_path, monkeypatch):
    """The folder of a copy of the intact build in a temporary build folder (this process keeps
    the intact build loaded: damaging a library that is loaded would crash it)."""
    folder, _ = intact_build
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    copy = cpu.build_directory()
    assert copy != folder
    shutil.copytree(folder, copy)
    return copy


def as_a_new_process(monkeypatch) -> None:
    """Forget the loaded kernel, so the next decode step loads the build folder again."""
    monkeypatch.setattr(cpu, "_state", {"tried": False, "module": None, "reason": None, "damage": None})


def layer_and_query():
    gen = torch.Generator().manual_seed(0)
    layer = CompressedLayer(QuantCodec(4, "channel", 32), QuantCodec(4, "token", 32), window=16, sinks=4, block_size=64)
    layer.update(torch.randn(1, 2, 700, 64, generator=gen), torch.randn(1, 2, 700, 64, generator=gen))
    return layer, torch.randn(1, 6, 1, 64, generator=gen)


def damage(folder, how: str) -> None:
    library = next(p for p in folder.iterdir() if p.name != MANIFEST_NAME)
    data = library.read_bytes()
    if how == "truncated":  # what a build killed while linking, or a full disk, leaves
        library.write_bytes(data[: len(data) // 2])
    elif how == "same size, other bytes":
        middle = len(data) // 2
        library.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:  # "no manifest": an unfinished build of an older version
        (folder / MANIFEST_NAME).unlink()


def kernel_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "kvcompress" in str(w.message)]


def no_temporaries(folder) -> bool:
    return not [p for p in folder.parent.iterdir() if TMP_MARK in p.name]


@pytest.mark.parametrize("how", ["truncated", "same size, other bytes", "no manifest"])
def test_a_damaged_build_warns_once_and_is_built_again(build_copy, intact_build, monkeypatch, how):
    layer, query = layer_and_query()
    expected = attend(layer, query, None, 0.125)  # the intact kernel (loaded by `intact_build`)
    damage(build_copy, how)
    as_a_new_process(monkeypatch)
    compiled = []

    def compile_by_copy(name, directory):  # stands in for the compiler: it writes the intact library
        compiled.append(directory)
        shutil.copy2(intact_build[1], directory / intact_build[1].name)
        (directory / "build.ninja").write_text("# an intermediate file the build folder does not keep\n")
        return cpu._import_library(name, directory / intact_build[1].name)

    monkeypatch.setattr(cpu, "_compile", compile_by_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attend(layer, query, None, 0.125) for _ in range(3)]
    messages = kernel_warnings(caught)
    assert len(messages) == 1 and "damaged" in messages[0] and "built again" in messages[0], messages
    assert len(compiled) == 1 and compiled[0].parent == build_copy.parent and compiled[0] != build_copy
    assert cpu.load() is not None and cpu.unavailable_reason() is None
    for out in outs:
        assert torch.equal(out, expected)
    manifest = check_directory(build_copy)  # the new build is checked like any other
    assert set(manifest["files"]) == set(manifest["sha256"]) == {intact_build[1].name}
    assert no_temporaries(build_copy)


def test_a_damaged_build_that_cannot_be_rebuilt_runs_the_torch_path(build_copy, monkeypatch):
    layer, query = layer_and_query()
    damage(build_copy, "truncated")
    as_a_new_process(monkeypatch)

    def failing_compile(name, directory):
        (directory / f"{name}.so").write_bytes(b"\x7fELF half a library")
        raise RuntimeError("Error building extension:\ncpu_decode.cpp:1:1: error: no space left on device")

    monkeypatch.setattr(cpu, "_compile", failing_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [attend(layer, query, None, 0.125) for _ in range(3)]
    messages = kernel_warnings(caught)
    assert len(messages) == 1, messages
    assert "damaged" in messages[0] and "could not be built" in messages[0] and "no space left" in messages[0]
    torch_path = attend_compressed(layer, query, None, 0.125)
    for out in outs:
        assert torch.equal(out, torch_path)
    assert not build_copy.exists() and no_temporaries(build_copy)  # the next process builds it afresh


def test_an_interrupted_build_leaves_no_finished_folder(build_copy, monkeypatch):
    shutil.rmtree(build_copy)
    as_a_new_process(monkeypatch)

    def interrupted_compile(name, directory):
        (directory / f"{name}.so").write_bytes(b"\x7fELF half a library")
        raise KeyboardInterrupt  # Ctrl-C or a kill while linking

    monkeypatch.setattr(cpu, "_compile", interrupted_compile)
    with pytest.raises(KeyboardInterrupt):
        cpu.load()
    assert not build_copy.exists() and no_temporaries(build_copy)


def expected_isa(flags: tuple[str, ...], cpu_flags: set[str]) -> str:
    """The vector path a build with `flags` on a CPU with `cpu_flags` (/proc/cpuinfo) must compile."""
    # the last of GCC's -m/-mno- switches for a feature wins; -mno-avx takes AVX2 and AVX-512 with it
    on = {"avx512f": "avx512f" in cpu_flags, "avx2": {"avx2", "fma", "f16c"} <= cpu_flags}
    for flag in flags:
        if flag in ("-mno-avx", "-mno-avx2"):
            on = {"avx512f": False, "avx2": False}
        elif flag == "-mno-avx512f":
            on["avx512f"] = False
    return "avx512" if on["avx512f"] else "avx2" if on["avx2"] else "scalar"


def test_the_build_compiles_the_widest_path_its_flags_allow(intact_build, monkeypatch):
    """`isa()` of the loaded build against this CPU's flags and $KVCOMPRESS_CPU_CFLAGS: `make test-isa`
    runs the kernel tests again with -mno-avx512f and -mno-avx, and this test proves those runs
    exercised the AVX2 and plain C++ paths, not the AVX-512 one."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    if not lines:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    cpu_flags = set(lines[0].split(":", 1)[1].split())
    assert cpu.load().isa() == expected_isa(cpu.cflags(), cpu_flags)


def test_extra_flags_come_from_the_environment_and_change_the_build_key(monkeypatch):
    monkeypatch.delenv(cpu.CFLAGS_ENV, raising=False)
    plain = cpu.build_key()
    assert cpu.cflags() == cpu.CFLAGS
    monkeypatch.setenv(cpu.CFLAGS_ENV, "-mno-avx512f  -DX='a b'")
    assert cpu.cflags() == cpu.CFLAGS + ("-mno-avx512f", "-DX=a b")
    assert cpu.build_key() != plain
    monkeypatch.setenv(cpu.CFLAGS_ENV, "-DX='unclosed")
    with pytest.raises(ValueError, match="KVCOMPRESS_CPU_CFLAGS=.*fix or unset it"):
        cpu.cflags()
