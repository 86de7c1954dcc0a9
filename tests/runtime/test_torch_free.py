"""The runtime imports and works with torch and transformers unavailable (no torch on devices).

Each check runs in a fresh interpreter whose ``sys.meta_path`` starts with a finder that refuses
``torch`` and ``transformers`` (and their submodules), as on a phone where they are not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class _Blocker(importlib.abc.MetaPathFinder):
        BLOCKED = {"torch", "transformers"}

        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{fullname} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, _Blocker())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_blocker_blocks_torch() -> None:
    result = _run(
        """
        try:
            import torch
        except ImportError as exc:
            print("blocked:", exc)
        else:
            raise SystemExit("torch was importable")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "blocked: torch is blocked" in result.stdout


def test_runtime_imports_and_loads_a_profile_without_torch() -> None:
    result = _run(
        """
        import sys
        import tempfile

        import shadowpeft.runtime.contract
        import shadowpeft.runtime.devices
        import shadowpeft.runtime.kv
        import shadowpeft.runtime.manifest
        from shadowpeft.runtime.contract import GraphSpec, TensorSpec
        from shadowpeft.runtime.devices import list_device_profiles, load_device_profile
        from shadowpeft.runtime.manifest import Manifest

        names = list_device_profiles()
        assert names, "no device profiles found"
        for name in names:
            load_device_profile(name)
        profile = load_device_profile("arm64-phone")

        spec = TensorSpec("input_ids", "int64", ("batch_size", "sequence_length"))
        out = TensorSpec("logits", "float32", ("batch_size", "sequence_length", 8))
        graph = GraphSpec("device/shadow.onnx", "detached-shadow", 17, (spec,), (out,), profile.weights, "0" * 64)
        graphs = {"device/shadow": graph}
        manifest = Manifest(1, "0.1.0", "base", None, "fp", graphs, 2, 8, (), profile.name, "none", {})
        with tempfile.TemporaryDirectory() as folder:
            assert Manifest.from_file(manifest.write(folder)) == manifest

        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers"})
        assert not loaded, loaded
        print("ok", profile.name, len(names))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok arm64-phone ")


def test_runtime_package_does_not_pull_in_shadowpeft_torch_parts() -> None:
    result = _run(
        """
        import sys

        import shadowpeft.runtime
        import shadowpeft.runtime.errors

        assert "shadowpeft.model" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_runtime_loads_an_export_and_generates_without_torch(toy_export) -> None:
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.generate import Generator
    from shadowpeft.runtime.sampling import SamplingConfig

    prompt = [5, 9, 31, 7]
    (expected,) = Generator(open_export(toy_export.export)).generate([prompt], SamplingConfig(max_new_tokens=6))
    result = _run(
        f"""
        import sys

        from click.testing import CliRunner

        from shadowpeft.runtime.export_dir import open_export
        from shadowpeft.runtime.generate import Generator
        from shadowpeft.runtime.run_cli import main
        from shadowpeft.runtime.sampling import SamplingConfig
        from shadowpeft.runtime.tokenizer import RuntimeTokenizer

        export = open_export({str(toy_export.export)!r})
        tokenizer = RuntimeTokenizer.from_export(export.root, export.manifest)
        (result,) = Generator(export).generate([{prompt!r}], SamplingConfig(max_new_tokens=6))
        cli = CliRunner().invoke(main, [{str(toy_export.export)!r}, "-p", "the color is red", "--no-chat", "--json"])
        assert cli.exit_code == 0, cli.output
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers"}})
        assert not loaded, loaded
        print("tokens", result.token_ids)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"tokens {expected.token_ids}"
