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

from runtime.model import Model

from . import artifacts, cache_graphs, check, graphs, migraphx_ref, verify
from .decoder import DecoderStep
from .load import Source, SourceError, resolve
from .verify import VerificationError
from .vision import VisionEncoder

DTYPES = ("fp32", "fp16")
OUR_FILES = {"manifest.json", "vision.onnx", "vision.onnx.data", "decoder.onnx", "decoder.onnx.data", "prefill.onnx",
             "prefill.onnx.data", "cache_write.onnx", "cache_rope.onnx", "embed_tokens.npy", "tokenizer"}


@dataclass
class ExportOptions:
    model: str
    out: Path | None = None  # default graphs/<name>
    dtype: str = "fp32"
    random_weights: bool = False
    force: bool = False
    verify: bool = True
    migraphx: bool = True  # with verify: also prove the graphs on MIGraphX's ref target when it is importable


def run(opts: ExportOptions, log=print) -> Path:
    if opts.dtype not in DTYPES:
        raise SourceError(f"dtype {opts.dtype!r} is not available yet; use one of {', '.join(DTYPES)}")
    source = resolve(opts.model, opts.random_weights)
    out = _out(opts, source)
    if not opts.force and _up_to_date(out, source, opts.dtype):
        log(f"{out}: up to date ({source.identity}), reusing it; --force exports again")
        return out
    _make_room(out, opts.force)

    start = time.perf_counter()
    log(f"building {source.name} ({'random weights' if source.folder is None else source.folder})")
    model = source.build_model()
    if opts.verify:  # transformers in fp32 is the reference for every dtype; computed before any conversion
        inputs = verify.cases(source.config)
        expected = verify.reference(model, inputs)
        log(f"reference outputs computed with transformers ({_peak_memory()})")
    # built before any fp16 conversion: the wrappers keep fp32 copies of the rotary frequencies
    encoder, step, prefill = VisionEncoder(model.model.visual), DecoderStep(model), DecoderStep(model, prefill=True)
    if opts.dtype == "fp16":
        graphs.to_fp16(model)
    metadata = {"format_version": FORMAT_VERSION, "model": source.name, "dtype": opts.dtype}
    log(f"exporting vision.onnx ({_peak_memory()})")
    graphs.export_vision(encoder, source.config, opts.dtype, out / "vision.onnx", metadata)
    gc.collect()  # the traced program holds copies of weights: let them go before the next trace
    log(f"exporting decoder.onnx ({_peak_memory()})")
    weights = graphs.export_decoder(step, source.config, opts.dtype, out / "decoder.onnx", metadata)
    gc.collect()
    log(f"exporting prefill.onnx, weights shared with decoder.onnx ({_peak_memory()})")
    graphs.export_decoder(prefill, source.config, opts.dtype, out / "prefill.onnx", metadata, weights)
    gc.collect()
    text = source.config.text_config
    layout = (text.num_hidden_layers, text.num_key_value_heads, text.head_dim, opts.dtype)
    cache_graphs.cache_write(*layout, out / "cache_write.onnx")
    cache_graphs.cache_rope(*layout, step.inv_freq.numpy(), step.channel_axis.numpy(), out / "cache_rope.onnx")
    manifest = artifacts.build_manifest(source, step.inv_freq, out, opts.dtype, artifacts.write_embeddings(model, out),
                                        artifacts.copy_tokenizer(source, out))
    del model, encoder, step, prefill  # the PyTorch weights go before the ONNX ones load: a 4B model does not fit twice
    gc.collect()
    log(f"exported in {time.perf_counter() - start:.0f} s ({_peak_memory()}); checking the graphs")
    problems = []
    for contract in manifest["graphs"].values():
        problems += [f"{contract['file']}: {p}" for p in check.check_file(out / contract["file"])]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SourceError(f"the exported graphs fail the graph check: {problems[0]}{more}")

    manifest["verification"] = None
    if opts.verify:
        log("verifying against transformers (ONNX Runtime, CPU)")
        actual = verify.candidate(Model(Manifest(out, manifest)), inputs, source.config,
                                  expected["prompt"]["tokens"])
        manifest["verification"] = {**verify.compare(expected, actual, opts.dtype, log),
                                    "tolerance": f"{verify.RTOL[opts.dtype]} x max(1, max|reference|)",
                                    "greedy_agreement_min": verify.AGREEMENT[opts.dtype],
                                    "reference": "transformers, float32"}
        if opts.migraphx:
            manifest["verification"]["migraphx_ref"] = _prove_on_migraphx(Manifest(out, manifest), log)
    manifest["files"] = artifacts.file_table(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"done: {out} in {time.perf_counter() - start:.0f} s ({_peak_memory()})")
    return out


def _prove_on_migraphx(manifest: Manifest, log) -> dict | str:
    """Every graph on MIGraphX's parser and ref target against ONNX Runtime, at small static shapes (one merge
    block per frame, 64 cache slots: the ref target runs naive loops); the reason when MIGraphX is not here."""
    try:
        migraphx_ref.load()
    except migraphx_ref.Unavailable as error:
        log(f"not proven on MIGraphX: {error}")
        return str(error)
    log("proving the graphs on MIGraphX (ONNX parser + ref target, CPU) against ONNX Runtime")
    block = manifest["preprocess"]["patch_size"] * manifest["preprocess"]["merge_size"]
    results, problems = migraphx_ref.check(manifest, (block, block), capacity=64,
                                           log=lambda line: log("  " + line.replace("\n", "\n  ")))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(f"MIGraphX (ref target) disagrees: {problems[0]}{more}")
    return {r.case.label: r.errors for r in results}


def _peak_memory() -> str:
    import resource

    return f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def up_to_date(opts: ExportOptions) -> bool:
    """Whether `opts.out` already holds this export, made by this version (run() would reuse it)."""
    source = resolve(opts.model, opts.random_weights)
    return _up_to_date(_out(opts, source), source, opts.dtype)


def _out(opts: ExportOptions, source: Source) -> Path:
    return Path(opts.out) if opts.out else Path("graphs") / source.name


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
