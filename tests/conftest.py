import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "export" / "presets"


def hf_folder(folder: Path, preset: str, **changes) -> Path:
    """A Hugging Face style folder holding only a config.json: `preset` with dotted-key changes
    (e.g. `text_config.num_hidden_layers=2`)."""
    config = json.loads((PRESETS / f"{preset}.json").read_text())
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def cli(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory) -> Path:
    """The built-in tiny model, exported and proven once for the whole test session."""
    from export.pipeline import ExportOptions, run

    return run(ExportOptions("tiny", tmp_path_factory.mktemp("graphs") / "tiny"))


@pytest.fixture(scope="session")
def tiny16(tmp_path_factory) -> Path:
    """The tiny model exported in fp16, once for the whole test session."""
    from export.pipeline import ExportOptions, run

    return run(ExportOptions("tiny", tmp_path_factory.mktemp("fp16") / "tiny16", dtype="fp16"))


@pytest.fixture(scope="session")
def micro_graphs(tmp_path_factory) -> Path:
    """The committed micro folder through `python -m export` (the path a real checkpoint takes), proven against
    transformers like every export; once for the whole test session."""
    from export.pipeline import ExportOptions, run

    folder = PRESETS / "micro"
    out = run(ExportOptions("micro", tmp_path_factory.mktemp("graphs") / "micro"))
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert manifest["tokens"]["video_pad"] == config["video_token_id"]
    assert manifest["stop_tokens"] == json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert manifest["verification"]["greedy_agreement"] == 1.0  # greedy tokens identical to generate()
    return out
