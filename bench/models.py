"""The models the benchmark runs: the built-in tiny one and the real 4B widths with a few layers (random weights)."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from export.load import PRESET_DIR, resolve
from export.pipeline import ExportOptions, run, up_to_date
from runtime.manifest import Manifest
from runtime.model import Model

WIDE_LAYERS, WIDE_VISION_LAYERS = 4, 4  # what fits this machine's memory and time; the widths are the real ones


@dataclass
class BenchModel:
    graphs: Path
    source: str  # what export.load.resolve takes

    def model(self, threads: int = 0, providers=("CPUExecutionProvider",), options=None) -> Model:
        return Model(Manifest.load(self.graphs), providers, threads, options)

    def hf_model(self):
        return resolve(self.source, random_weights=True).build_model()

    def describe(self) -> dict:
        manifest = Manifest.load(self.graphs)
        text, vision = manifest["text"], manifest["vision"]
        return {"model": manifest["name"], "hidden": text["hidden_size"], "layers": text["num_hidden_layers"],
                "heads": text["num_attention_heads"], "kv_heads": text["num_key_value_heads"],
                "head_dim": text["head_dim"], "ffn": manifest["config"]["text_config"]["intermediate_size"],
                "vocab": text["vocab_size"], "vision_hidden": vision["hidden_size"], "vision_layers": vision["depth"]}


def wide_folder(root: Path, layers: int = WIDE_LAYERS, vision_layers: int = WIDE_VISION_LAYERS,
                base: str = "Qwen3-VL-4B") -> Path:
    """A Hugging Face folder (config.json only) with the preset's widths and `layers` decoder layers."""
    config = json.loads((PRESET_DIR / f"{base}.json").read_text())
    config["text_config"]["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = vision_layers
    config["vision_config"]["deepstack_visual_indexes"] = list(range(min(3, vision_layers)))
    folder = root / f"{base}-{layers}L"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _export(opts: ExportOptions, log) -> Path:
    """Reuse an up-to-date export; replace one made by another version or from another config."""
    return run(replace(opts, force=not up_to_date(opts)), log=log)


def build_exports(root: Path, quick: bool = False, dtype: str = "fp32") -> dict[str, BenchModel]:
    """Exports reused across runs (an up-to-date export is not redone). Graph parity is the tests' business."""
    root.mkdir(parents=True, exist_ok=True)
    tiny = _export(ExportOptions("tiny", root / f"tiny-{dtype}", dtype=dtype, verify=False), log=lambda *_: None)
    models = {"tiny": BenchModel(tiny, "tiny")}
    if quick:
        int4 = _export(ExportOptions("tiny", root / "tiny-int4", verify=False, quant="int4"), log=lambda *_: None)
        models["wide"], models["wide_int4"] = models["tiny"], BenchModel(int4, "tiny")
        return models
    folder = wide_folder(root)
    wide = _export(ExportOptions(str(folder), root / f"{folder.name}-{dtype}", dtype=dtype, random_weights=True,
                                 verify=False), log=print)
    models["wide"] = BenchModel(wide, str(folder))
    # int4 weights with this dtype's activations, made from (and measured against) these float graphs
    name = f"{folder.name}-int4" if dtype == "fp32" else f"{folder.name}-int4-{dtype}"
    int4 = _export(ExportOptions(str(folder), root / name, dtype=dtype, random_weights=True, verify=False,
                                 quant="int4"), log=print)
    models["wide_int4"] = BenchModel(int4, str(folder))
    return models
