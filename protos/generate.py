"""Regenerate the Python code of the toolchain.v1 contract from protos/.

    python protos/generate.py          # rewrite clients/python/toolchain_proto/v1
    python protos/generate.py --check  # exit 1 when the checked-in code is stale

protoc names the generated package after the proto package (`toolchain.v1`); it is
installed as `toolchain_proto.v1` so that it cannot collide with another `toolchain`
package, so the one cross-module import is rewritten after generation.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "clients" / "python" / "toolchain_proto" / "v1"
BIN = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(into: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "toolchain" / "v1").glob("*.proto"))
    well_known = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        into.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / "toolchain" / "v1").iterdir()):
            text = produced.read_text()
            text = text.replace("from toolchain.v1 import", "from toolchain_proto.v1 import")
            text = text.replace("import toolchain.v1.", "import toolchain_proto.v1.")
            (into / produced.name).write_text(text)
    (into / "__init__.py").write_text(
        '"""Generated code of the toolchain.v1 contract; see protos/generate.py."""\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when the checked-in code is stale")
    opts = parser.parse_args()
    if not opts.check:
        for old in TARGET.glob("*"):
            if old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
        generate(TARGET)
        print(f"generated {TARGET.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1"
        generate(fresh)
        names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in TARGET.glob("*") if p.is_file()})
        stale = [
            n
            for n in names
            if not (fresh / n).exists()
            or not (TARGET / n).exists()
            or not filecmp.cmp(fresh / n, TARGET / n, shallow=False)
        ]
        if stale:
            print(
                "generated code is stale, run: python protos/generate.py", *stale, sep="\n  ", file=sys.stderr
            )
            return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
