"""`manifest.json`: the one written contract between the exporter and the runtime.

The exporter writes it (every number the runtime needs, the I/O of every graph, file hashes); the runtime reads
it and refuses anything it does not understand rather than guessing.
"""

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "qwen3vl-stream"
FORMAT_VERSION = 3  # 2: prefill.onnx beside decoder.onnx; 3: quantized graphs (the runtime must prepack them)

ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 9: "bool", 6: "int32", 2: "uint8", 3: "int8",
               22: "int4"}  # TensorProto
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
              "tensor(bool)": "bool", "tensor(int32)": "int32"}


class ManifestError(Exception):
    """Artifacts the runtime cannot use; the message is one line that says what to do."""


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise ManifestError(f"no exported graphs in {root} (missing manifest.json): run `make export MODEL=tiny` "
                                "or pass --graphs")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise ManifestError(f"{path} is not valid JSON ({error}): export again with --force") from None
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{root} holds graphs of format {data.get('format')!r} version "
                                f"{data.get('format_version')!r}; this runtime reads {FORMAT!r} version "
                                f"{FORMAT_VERSION}: export again with this version (make export ... --force)")
        manifest = cls(root, data)
        manifest.check_files()
        return manifest

    def __getitem__(self, key):
        return self.data[key]

    def path(self, name: str) -> Path:
        return self.root / name

    def check_files(self, hashes: bool = False) -> None:
        """Every listed file exists with its recorded size (and hash, when asked: slow for big models)."""
        for name, info in self.data["files"].items():
            path = self.root / name
            if not path.is_file():
                raise ManifestError(f"{path} is missing: export again (make export ... --force)")
            if path.stat().st_size != info["bytes"]:
                raise ManifestError(f"{path} has {path.stat().st_size} bytes, the manifest says {info['bytes']}: "
                                    "the export is incomplete or was changed; export again with --force")
            if hashes and file_sha256(path) != info["sha256"]:
                raise ManifestError(f"{path} does not match its sha256 in the manifest: export again with --force")

    def check_session(self, graph: str, session) -> None:
        """An onnxruntime session's inputs and outputs must be exactly the contract written for `graph`."""
        contract = self.data["graphs"][graph]
        for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
            found = [(v.name, ORT_DTYPES.get(v.type, v.type), len(v.shape)) for v in actual]
            wanted = [(v["name"], v["dtype"], len(v["shape"])) for v in contract[kind]]
            if found != wanted:
                raise ManifestError(f"{graph} graph {kind} do not match the manifest in {self.root}: "
                                    "export again with --force")


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
