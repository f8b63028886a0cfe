"""One export: resolve the model, write the graphs and artifacts, lint them, prove them, then the manifest.

The manifest is written last: a folder without one is an unfinished export, never mistaken for a good one.
"""

import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import FORMAT_VERSION, Manifest, ManifestError

from . import artifacts, check, graphs
from .load import Source, SourceError, resolve

DTYPES = ("fp32",)  # fp16 arrives with the AMD path
OUR_FILES = {"manifest.json", "vision.onnx", "vision.onnx.data", "decoder.onnx", "decoder.onnx.data",
             "embed_tokens.npy", "tokenizer"}


@dataclass
class ExportOptions:
    model: str
    out: Path | None = None  # default graphs/<name>
    dtype: str = "fp32"
    random_weights: bool = False
    force: bool = False
    verify: bool = True


def run(opts: ExportOptions, log=print) -> Path:
    if opts.dtype not in DTYPES:
        raise SourceError(f"dtype {opts.dtype!r} is not available yet; use one of {', '.join(DTYPES)}")
    source = resolve(opts.model, opts.random_weights)
    out = Path(opts.out) if opts.out else Path("graphs") / source.name
    if not opts.force and _up_to_date(out, source, opts.dtype):
        log(f"{out}: up to date ({source.identity}), reusing it; --force exports again")
        return out
    _make_room(out, opts.force)

    start = time.perf_counter()
    log(f"building {source.name} ({'random weights' if source.folder is None else source.folder})")
    model = source.build_model()
    metadata = {"format_version": FORMAT_VERSION, "model": source.name, "dtype": opts.dtype}
    log(f"exporting vision.onnx ({_peak_memory()})")
    graphs.export_vision(model, out / "vision.onnx", metadata)
    gc.collect()  # the traced program holds copies of weights: let them go before the next trace
    log(f"exporting decoder.onnx ({_peak_memory()})")
    graphs.export_decoder(model, out / "decoder.onnx", metadata)
    gc.collect()
    manifest = artifacts.build_manifest(source, model, out, opts.dtype, artifacts.write_embeddings(model, out),
                                        artifacts.copy_tokenizer(source, out))
    log(f"exported in {time.perf_counter() - start:.0f} s ({_peak_memory()}); checking the graphs")
    problems = []
    for name, contract in manifest["graphs"].items():
        proto = check.onnx.load(str(out / contract["file"]), load_external_data=False)
        problems += [f"{contract['file']}: {p}" for p in check.check_model(proto)]
    if problems:
        raise SourceError(f"the exported graphs fail the graph check: {problems[0]} (and {len(problems) - 1} more)")

    manifest["verification"] = None
    if opts.verify:
        from runtime.model import Model

        from . import verify

        log("verifying against transformers (ONNX Runtime, CPU)")
        inputs = verify.cases(source.config)
        expected = verify.reference(model, inputs)
        log(f"  transformers side done ({_peak_memory()})")
        del model  # the PyTorch weights go before the ONNX ones load: a 4B model does not fit twice
        gc.collect()
        actual = verify.candidate(Model(Manifest(out, manifest)), inputs, source.config)
        manifest["verification"] = {"max_abs_errors": verify.compare(expected, actual, log),
                                    "tolerance": f"{verify.RTOL} x max(1, max|reference|)",
                                    "greedy_tokens": "identical"}
    manifest["files"] = artifacts.file_table(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"done: {out} in {time.perf_counter() - start:.0f} s ({_peak_memory()})")
    return out


def _peak_memory() -> str:
    import resource

    return f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def _up_to_date(out: Path, source: Source, dtype: str) -> bool:
    try:
        manifest = Manifest.load(out)
    except ManifestError:
        return False
    return manifest["source"]["identity"] == source.identity and manifest["dtype"] == dtype


def _make_room(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out} exists and is not a folder; choose another OUT")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        if entries and not force and (not entries <= OUR_FILES or "manifest.json" in entries):
            what = "a different export" if "manifest.json" in entries else "files that are not an export"
            raise SourceError(f"{out} already holds {what}; pass --force (FORCE=1) to replace it, "
                              "or choose another OUT")
        for name in entries & OUR_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
