"""One export: resolve the model, write the graphs and artifacts, lint them, prove them, then the manifest.

The manifest is written last: a folder without one is an unfinished export, never mistaken for a good one.
"""

import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.manifest import FORMAT_VERSION, Manifest, ManifestError

from runtime.model import Model

from . import artifacts, cache_graphs, check, graphs, migraphx_ref, quality, quantize, verify
from .decoder import DecoderStep
from .load import Source, SourceError, resolve
from .verify import VerificationError
from .vision import VisionEncoder

DTYPES = ("fp32", "fp16")
QUANTS = ("int4",)
STAGE = "quantized"  # the quantized graphs are written here, measured, then moved over the float ones
OUR_FILES = {STAGE, "manifest.json", "vision.onnx", "vision.onnx.data", "decoder.onnx", "decoder.onnx.data",
             "prefill.onnx", "prefill.onnx.data", "cache_write.onnx", "cache_rope.onnx", "embed_tokens.npy",
             "tokenizer"}


@dataclass
class ExportOptions:
    model: str
    out: Path | None = None  # default graphs/<name>
    dtype: str = "fp32"
    random_weights: bool = False
    force: bool = False
    verify: bool = True
    migraphx: bool = True  # with verify: also prove the graphs on MIGraphX's ref target when it is importable
    quant: str | None = None  # "int4": 4-bit weights in the decoder's matrix products (export/quantize.py)
    quant_form: str = "matmulnbits"  # or "dequantizelinear" (standard ONNX, opset 21)
    quant_block: int | None = None  # weights per scale (export/quantize.py: BLOCKS); None: quantize.default_block


def run(opts: ExportOptions, log=print) -> Path:
    if opts.dtype not in DTYPES:
        raise SourceError(f"dtype {opts.dtype!r} is not available yet; use one of {', '.join(DTYPES)}")
    if opts.quant is not None and opts.quant not in QUANTS:
        raise SourceError(f"quantization {opts.quant!r} is not available; use one of {', '.join(QUANTS)}")
    if opts.quant_form not in quantize.FORMS:
        raise SourceError(f"unknown quantized form {opts.quant_form!r}; use one of {', '.join(quantize.FORMS)}")
    source = resolve(opts.model, opts.random_weights)
    opts = _with_block(opts, source)
    fits = quantize.blocks(source.config.text_config)  # a subset of quantize.BLOCKS: also refuses an unknown size
    if opts.quant and opts.quant_block not in fits:
        raise SourceError(f"block size {opts.quant_block} does not fit {source.name}'s widths (a whole number of "
                          f"blocks, at least two, along every product's inner size); "
                          + (f"use {', '.join(map(str, fits))}" if fits else "no block size does"))
    out = _out(opts, source)
    if not opts.force and _up_to_date(out, source, opts):
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
    manifest["quantization"] = None
    if opts.quant:
        manifest["quantization"] = _quantize(out, manifest, opts, source.folder is None, log)
    if opts.verify and opts.migraphx:
        manifest["verification"]["migraphx_ref"] = _prove_on_migraphx(Manifest(out, manifest), log)
    manifest["files"] = artifacts.file_table(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"done: {out} in {time.perf_counter() - start:.0f} s ({_peak_memory()})")
    return out


def _quantize(out: Path, manifest: dict, opts: ExportOptions, random_weights: bool, log) -> dict:
    """Quantize the decoder graphs and hold them to the quality budget (export/quality.py) against the float graphs
    they come from (fp32, or fp16: int4 weights with fp16 activations), keeping more at 8 bits step by step
    (`quality.ladder`) until it holds; fail if it never does."""
    log(f"quality reference: the {opts.dtype} graphs, teacher forced over the fixed text and video prompts")
    reference = quality.run(Model(Manifest(out, manifest)))
    stage = out / STAGE
    table = np.load(out / manifest["embeddings"]["file"], mmap_mode="r")
    # random weights: only the first step (the budget's end-to-end numbers do not measure quality there)
    steps = [()] if random_weights else quality.ladder(manifest["text"]["num_hidden_layers"])
    for eight_bit in steps:
        scheme = quantize.Scheme(block_size=opts.quant_block, form=opts.quant_form, eight_bit=eight_bit)
        shutil.rmtree(stage, ignore_errors=True)
        stats = quantize.quantize_folder(out, stage, scheme, log=log)
        np.save(stage / "embed_tokens.npy", table.astype(np.float16))  # looked up, never multiplied: fp16 is plenty
        candidate = {**manifest, "graphs": {**manifest["graphs"], **_contracts(stage, prefix=STAGE + "/")},
                     "embeddings": {**manifest["embeddings"], "file": f"{STAGE}/embed_tokens.npy", "dtype": "float16"}}
        log(f"measuring {opts.quant} ({', '.join(eight_bit) or 'nothing'} at 8 bits) against the {opts.dtype} graphs")
        metrics = quality.compare(reference, quality.run(Model(Manifest(out, candidate))), not random_weights)
        problems = quality.failures(metrics, stats["weight_rel_error"]["max"], not random_weights)
        log("  " + ", ".join(f"{k} {metrics[k]:.4g}" for k in quality.BUDGET if metrics[k] is not None) + (
            " (within budget)" if not problems else " (over budget)") + (
            "; random weights: recorded, each matrix held to its rounding error" if random_weights else ""))
        if not problems:
            break
    else:
        raise VerificationError(f"{opts.quant} weights miss the quality budget even with every matrix at 8 bits: "
                                f"{problems[0]}")
    del table
    for name in ("prefill.onnx.data", "decoder.onnx.data"):
        (out / name).unlink(missing_ok=True)
    for path in stage.iterdir():
        os.replace(path, out / path.name)
    stage.rmdir()
    manifest["graphs"].update(_contracts(out))
    problems = [f"{g}.onnx: {p}" for g in ("decoder", "prefill") for p in check.check_file(out / f"{g}.onnx")]
    if problems:
        raise SourceError(f"the quantized graphs fail the graph check: {problems[0]}")
    manifest["embeddings"] = {**manifest["embeddings"], "dtype": "float16"}
    return {"name": opts.quant, "scheme": scheme.describe(), **stats, "quality": metrics,
            "budget": quality.BUDGET if not random_weights else {"weight_rel_error_max": quality.WEIGHT_ERROR},
            "budget_applies": "end to end (trained weights)" if not random_weights else
            "per matrix (random weights: the end-to-end numbers are recorded; see export/quality.py)",
            "reference": f"this export's {opts.dtype} ONNX graphs (ONNX Runtime, CPU)"}


def _contracts(folder: Path, prefix: str = "") -> dict:
    """The decoder graphs' contracts, with file names relative to the export's root."""
    out = {}
    for graph in ("decoder", "prefill"):
        contract = artifacts.graph_contract(folder / f"{graph}.onnx")
        contract["file"] = prefix + contract["file"]
        for weight in contract.get("external_weights", []):
            weight["file"] = prefix + weight["file"]
        out[graph] = contract
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
    opts = _with_block(opts, source)
    return _up_to_date(_out(opts, source), source, opts)


def _with_block(opts: ExportOptions, source: Source) -> ExportOptions:
    """The block size `opts` asks for, or the model's default (export/quantize.py: default_block)."""
    return opts if opts.quant_block else replace(opts, quant_block=quantize.default_block(source.config.text_config))


def _out(opts: ExportOptions, source: Source) -> Path:
    return Path(opts.out) if opts.out else Path("graphs") / (source.name + (f"-{opts.quant}" if opts.quant else ""))


def _up_to_date(out: Path, source: Source, opts: ExportOptions) -> bool:
    try:
        manifest = Manifest.load(out)
    except ManifestError:
        return False
    quant = manifest.data.get("quantization") or {}
    scheme = quant.get("scheme", {})
    return (manifest["source"]["identity"] == source.identity and manifest["dtype"] == opts.dtype
            and quant.get("name") == opts.quant and scheme.get("form", opts.quant_form) == opts.quant_form
            and scheme.get("block_size") in (None, opts.quant_block))


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
