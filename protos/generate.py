"""Regenerate the code of the toolchain.v1 contract, for every language, from protos/.

    python protos/generate.py          # rewrite every generated tree below
    python protos/generate.py --check  # exit 1 when any checked-in file is stale

One protoc (grpcio-tools') with pinned plugins that `.ci/setup-codegen` installs into
`.ci/bin` and `.ci/node_modules`, so the output depends only on protos/ and those pins:

    clients/python/toolchain_proto/v1/     python + grpc + mypy stubs
    service/toolchain_service/transport/contract.binpb
                                           descriptor set with source comments (reflection)
    clients/go/toolchainv1/                protoc-gen-go + protoc-gen-go-grpc
    clients/typescript/src/gen/            protoc-gen-es (TypeScript, with google/rpc)
    clients/java/src/main/java/io/toolchaingrpc/toolchain/v1/
                                           protoc's java + protoc-gen-grpc-java

protoc names the Python package after the proto package (`toolchain.v1`); it is installed
as `toolchain_proto.v1` so that it cannot collide with another `toolchain` package, so the
one cross-module import is rewritten after generation. The google.rpc protos vendored under
protos/google are generated only for TypeScript: Python, Go and Java use their published
packages.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PY_BIN = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
CI_BIN = ROOT / ".ci" / "bin"
NODE_BIN = ROOT / ".ci" / "node_modules" / ".bin"
WELL_KNOWN = Path(protoc.__file__).parent / "_proto"
GO_MODULE = "github.com/toolchain-grpc/toolchain-grpc/clients/go"


def _contract() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "toolchain" / "v1").glob("*.proto"))


def _google_rpc() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "google" / "rpc").glob("*.proto"))


def _protoc(*args: str) -> None:
    if protoc.main(["protoc", f"-I{PROTOS}", f"-I{WELL_KNOWN}", *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def _plugin(name: str, where: Path) -> str:
    path = where / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bash .ci/setup-codegen")
    return f"--plugin={name}={path}"


def _python(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(
            _plugin("protoc-gen-mypy", PY_BIN),
            _plugin("protoc-gen-mypy_grpc", PY_BIN),
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *_contract(),
        )
        out.mkdir(parents=True, exist_ok=True)
        for produced in sorted((Path(tmp) / "toolchain" / "v1").iterdir()):
            text = produced.read_text()
            text = text.replace("from toolchain.v1 import", "from toolchain_proto.v1 import")
            text = text.replace("import toolchain.v1.", "import toolchain_proto.v1.")
            (out / produced.name).write_text(text)
    (out / "__init__.py").write_text(
        '"""Generated code of the toolchain.v1 contract; see protos/generate.py."""\n'
    )


def _descriptors(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        f"--descriptor_set_out={out / 'contract.binpb'}",
        "--include_source_info",
        "--include_imports",
        *_contract(),
    )


def _go(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        _plugin("protoc-gen-go", CI_BIN),
        _plugin("protoc-gen-go-grpc", CI_BIN),
        f"--go_out={out}",
        f"--go_opt=module={GO_MODULE}/toolchainv1",
        f"--go-grpc_out={out}",
        f"--go-grpc_opt=module={GO_MODULE}/toolchainv1",
        *_contract(),
    )


def _typescript(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _protoc(
        _plugin("protoc-gen-es", NODE_BIN),
        f"--es_out={out}",
        "--es_opt=target=ts,import_extension=js",
        *_contract(),
        *_google_rpc(),
    )


def _java(out: Path) -> None:
    # grpcio-tools' protoc has no Java generator: Maven Central's protoc of the same version.
    out.mkdir(parents=True, exist_ok=True)
    binary = CI_BIN / "protoc"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run bash .ci/setup-codegen")
    with tempfile.TemporaryDirectory() as tmp:
        args = [f"-I{PROTOS}", f"-I{WELL_KNOWN}", _plugin("protoc-gen-grpc-java", CI_BIN)]
        args += [f"--java_out={tmp}", f"--grpc-java_out={tmp}", *_contract()]
        if subprocess.run([str(binary), *args], check=False).returncode != 0:  # noqa: S603  # our own pinned protoc
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        shutil.copytree(Path(tmp) / "io" / "toolchaingrpc" / "toolchain" / "v1", out, dirs_exist_ok=True)


@dataclass(frozen=True)
class Target:
    """One generated tree: `generate` fills the folder it is given with exactly the files of
    `folder`, whose other files (none, by design) `keep` would protect."""

    folder: Path
    generate: Callable[[Path], None]
    keep: tuple[str, ...] = ()


TARGETS = (
    Target(ROOT / "clients" / "python" / "toolchain_proto" / "v1", _python),
    Target(ROOT / "service" / "toolchain_service" / "transport" / "descriptors", _descriptors),
    Target(ROOT / "clients" / "go" / "toolchainv1", _go),
    Target(ROOT / "clients" / "typescript" / "src" / "gen", _typescript),
    Target(
        ROOT / "clients" / "java" / "src" / "main" / "java" / "io" / "toolchaingrpc" / "toolchain" / "v1",
        _java,
    ),
)


README = ROOT / "README.md"
_BEGIN = "<!-- error-reasons: generated by protos/generate.py from error_reason.proto -->"
_END = "<!-- error-reasons: end -->"


def _reason_table(descriptor_set: Path) -> str:
    """The README's table of ErrorReason values: name, status code, the proto's comment."""
    from google.protobuf import descriptor_pb2  # noqa: PLC0415  # grpcio-tools' dependency

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    (proto,) = [f for f in files if f.name == "toolchain/v1/error_reason.proto"]
    (enum,) = proto.enum_type
    comments = {
        tuple(loc.path): " ".join(loc.leading_comments.split()) for loc in proto.source_code_info.location
    }
    rows = ["| ErrorInfo reason | Status | Meaning, and what to do |", "|---|---|---|"]
    for index, value in enumerate(enum.value):
        if value.number == 0:
            continue
        code, _, meaning = comments[(5, 0, 2, index)].partition(": ")  # enum 0, its value `index`
        rows.append(f"| `{value.name}` | {code} | {meaning} |")
    return "\n".join(rows)


def _readme(descriptor_set: Path) -> tuple[str, str]:
    """README.md as it is, and as it should be with the generated reason table."""
    text = README.read_text()
    start, end = text.index(_BEGIN) + len(_BEGIN), text.index(_END)
    return text, f"{text[:start]}\n{_reason_table(descriptor_set)}\n{text[end:]}"


def _files(folder: Path) -> set[str]:
    if not folder.exists():
        return set()
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail when the checked-in code is stale")
    opts = parser.parse_args()
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, target in enumerate(TARGETS):
            fresh = Path(tmp) / str(i)
            target.generate(fresh)
            theirs = _files(target.folder) - set(target.keep)
            ours = _files(fresh)
            changed = sorted(
                n
                for n in ours | theirs
                if n not in ours
                or n not in theirs
                or not filecmp.cmp(fresh / n, target.folder / n, shallow=False)
            )
            where = target.folder.relative_to(ROOT)
            if opts.check:
                stale += [f"{where}/{n}" for n in changed]
                continue
            for name in changed:
                if name not in ours:
                    (target.folder / name).unlink()
                else:
                    (target.folder / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(fresh / name, target.folder / name)
            print(f"generated {where} ({len(changed)} changed)")
        descriptors = next(i for i, t in enumerate(TARGETS) if t.generate is _descriptors)
        current, wanted = _readme(Path(tmp) / str(descriptors) / "contract.binpb")
        if current != wanted:
            if opts.check:
                stale.append("README.md (the error reason table)")
            else:
                README.write_text(wanted)
                print("generated the error reason table in README.md")
    if stale:
        print("generated code is stale, run: python protos/generate.py", *stale, sep="\n  ", file=sys.stderr)
        return 1
    if opts.check:
        print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
