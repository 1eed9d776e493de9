"""Generate spillgate's Python protobuf + gRPC code and .pyi stubs from protos/.

The one way to produce `services/spillgate/_proto/`. protoc (grpc_tools, with its bundled
well-known types) and mypy-protobuf's plugins write into a temporary directory; the
`spillgate/v1/` output is then flattened into `_proto/` and its imports are rewritten from
`spillgate.v1` to `spillgate._proto`. Output is deterministic for pinned tool versions.

    python scripts/gen_protos.py            # write; delete stale generated files
    python scripts/gen_protos.py --check    # write nothing; exit 1 listing every difference

`--protos DIR` and `--out DIR` point at other trees (tests use them). Files in the output
directory that are not generated modules (`__init__.py`, `py.typed`) are never touched.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTOS = REPO_ROOT / "protos"
DEFAULT_OUT = REPO_ROOT / "services" / "spillgate" / "_proto"

# The proto package directory that is flattened into the output package.
PROTO_PACKAGE_DIR = Path("spillgate", "v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
MAX_DIFF_LINES = 40

# Module references only: docstrings and RPC paths ("/spillgate.v1.RegistryService/Get")
# also contain "spillgate.v1" and must stay as they are.
_FROM_IMPORT = re.compile(r"^from spillgate\.v1 import ", re.MULTILINE)
_MODULE_REF = re.compile(r"\bspillgate\.v1\.(\w+_pb2(?:_grpc)?)\b")
_MODULE_PATH = re.compile(r"\bspillgate/v1/(\w+_pb2(?:_grpc)?\.pyi?)\b")


class GenError(Exception):
    """The protos cannot be generated (bad layout, missing tool, protoc failure)."""


def find_protos(protos_dir: Path) -> list[Path]:
    """Return every .proto under protos_dir, sorted; all must sit in spillgate/v1/."""
    package_dir = protos_dir / PROTO_PACKAGE_DIR
    protos = sorted(protos_dir.rglob("*.proto"))
    if not protos:
        raise GenError(f"no .proto files under {protos_dir}")
    misplaced = [p for p in protos if p.parent != package_dir]
    if misplaced:
        names = ", ".join(str(p.relative_to(protos_dir)) for p in misplaced)
        raise GenError(f"only {PROTO_PACKAGE_DIR}/*.proto can be flattened, found: {names}")
    return protos


def _plugin(name: str) -> Path:
    """Locate a protoc plugin next to this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return beside
    found = shutil.which(name)
    if found is None:
        raise GenError(f"{name} not found next to {sys.executable} or on PATH (mypy-protobuf)")
    return Path(found)


def run_protoc(protos_dir: Path, protos: list[Path], dest: Path) -> None:
    """Run grpc_tools.protoc with the Python, gRPC and mypy generators into dest."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={protos_dir}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={dest}",
        f"--grpc_python_out={dest}",
        f"--mypy_out=quiet:{dest}",
        f"--mypy_grpc_out=quiet:{dest}",
        *(str(p) for p in protos),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise GenError(f"protoc failed ({result.returncode}):\n{result.stderr.strip()}")


def rewrite_imports(text: str) -> str:
    """Point generated module references at the flattened `spillgate._proto` package."""
    text = _FROM_IMPORT.sub("from spillgate._proto import ", text)
    text = _MODULE_REF.sub(r"spillgate._proto.\1", text)
    return _MODULE_PATH.sub(r"spillgate/_proto/\1", text)


def is_generated(name: str) -> bool:
    """Whether a file name in the output directory is one this script owns."""
    return name.endswith(GENERATED_SUFFIXES)


def generate(protos_dir: Path) -> dict[str, str]:
    """Generate everything in memory: flattened file name -> final text."""
    protos = find_protos(protos_dir)
    with tempfile.TemporaryDirectory(prefix="spillgate-protos-") as tmp:
        dest = Path(tmp)
        run_protoc(protos_dir, protos, dest)
        produced = sorted(p for p in dest.rglob("*") if p.is_file())
        files: dict[str, str] = {}
        for path in produced:
            if path.parent != dest / PROTO_PACKAGE_DIR or not is_generated(path.name):
                raise GenError(f"unexpected protoc output: {path.relative_to(dest)}")
            files[path.name] = rewrite_imports(path.read_text(encoding="utf-8"))
    return files


def read_existing(out_dir: Path) -> dict[str, str]:
    """Generated files currently in out_dir: name -> text."""
    if not out_dir.is_dir():
        return {}
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(out_dir.iterdir())
        if p.is_file() and is_generated(p.name)
    }


def compare(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Describe every difference between generated and committed files (empty = same)."""
    problems: list[str] = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"missing: {name}")
        elif name not in expected:
            problems.append(f"extra (no proto generates it): {name}")
        elif expected[name] != actual[name]:
            diff = list(
                difflib.unified_diff(
                    actual[name].splitlines(),
                    expected[name].splitlines(),
                    f"committed/{name}",
                    f"generated/{name}",
                    lineterm="",
                )
            )
            shown = diff[:MAX_DIFF_LINES]
            if len(diff) > MAX_DIFF_LINES:
                shown.append(f"... {len(diff) - MAX_DIFF_LINES} more diff lines")
            problems.append(f"differs: {name}\n" + "\n".join(f"    {line}" for line in shown))
    return problems


def write(out_dir: Path, expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Make out_dir's generated files equal expected; return the names written or removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    touched: list[str] = []
    for name, text in sorted(expected.items()):
        if actual.get(name) != text:
            (out_dir / name).write_text(text, encoding="utf-8", newline="\n")
            touched.append(name)
    for name in sorted(actual.keys() - expected.keys()):
        (out_dir / name).unlink()
        touched.append(name)
    return touched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the output directory differs from what protos produce",
    )
    parser.add_argument("--protos", type=Path, default=DEFAULT_PROTOS, help="proto root")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="generated package dir")
    args = parser.parse_args(argv)
    protos_dir: Path = args.protos.resolve()
    out_dir: Path = args.out.resolve()

    try:
        expected = generate(protos_dir)
    except GenError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 2
    actual = read_existing(out_dir)

    if args.check:
        problems = compare(expected, actual)
        if problems:
            print(f"gen_protos: {out_dir} is out of date with {protos_dir}:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print("run `make protos` (python scripts/gen_protos.py) and commit", file=sys.stderr)
            return 1
        print(f"gen_protos: {len(expected)} generated files up to date")
        return 0

    touched = write(out_dir, expected, actual)
    print(f"gen_protos: {len(expected)} files generated, {len(touched)} changed in {out_dir}")
    for name in touched:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
