"""llama.cpp as the peer: the bench's random-weight model, converted by llama.cpp's own tools, decoded on CPU.

    python -m bench.llama_cpp [--lengths 256 4096 16384] [--threads 2] [--root build/bench/llama]

A CPU user who does not take our ONNX runtime takes llama.cpp, so this is the speed to beat. To compare like with
like it runs the *same* weights: the transformers model is saved as a Hugging Face folder, converted to GGUF F32 by
llama.cpp's converter (convert_hf_to_gguf.py, which knows Qwen3VLForConditionalGeneration and writes its text
decoder), then quantized to Q4_0 with llama.cpp's quantize API, the format a CPU user would actually download.
The F32 file's logits for a short prompt are checked against transformers', so a fast number cannot come from a
different model. The GGUF files are kept under --root, keyed on the weights, so a second run only measures.

Everything that calls into llama.cpp runs in a child process (`--worker`): a failed assertion in C aborts the
process, and the bench must get a one-line error instead of dying; the child's resident memory is also llama.cpp's
alone, not mixed with the torch model the bench holds. A `Peer` is such a child kept open and driven one command
at a time (fill the cache to n tokens, time one decode step, time a k-token fill), so that `make bench` times
llama.cpp's steps in turn with its own (the machine's drift hits both); each step is timed inside the child, so the
pipe's round trip is not counted.

The converter is not part of the installed wheel. It is taken from the llama-cpp-python source distribution of the
installed version (the same llama.cpp commit as the library): $LLAMA_CPP_SRC (an unpacked llama.cpp folder or the
sdist tarball), else `pip download` of that sdist, unpacked once under --root.
"""

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LENGTHS = (256, 4096, 16384)
N_BATCH = 512  # llama.cpp's default physical batch (n_ubatch); the fill goes through in chunks of this size
PROMPT_TOKENS = 16  # the logit check's prompt: the first tokens of the fill
STEPS, WARMUP = 5, 1  # timed single-token decode steps per cached length, after the warm-up ones
SEED = 0
ROOT = Path(__file__).resolve().parents[1]
WORKER_MARK = "LLAMA_CPP_RESULT "  # prefixes the child's one JSON line on stdout; llama.cpp may print around it


def peer_rows(model, lengths=LENGTHS, threads: int = 0, root: Path = Path("build/bench/llama"), log=None) -> dict:
    """llama.cpp's decode ms/token at each cached length for the F32 and Q4_0 GGUF of `model`, alone (`make bench`
    times the same steps in turn with ours through `open_peers`).

    `model` is what export.load.resolve takes (built with random weights, the bench's `BenchModel.source`) or an
    already built transformers Qwen3VLForConditionalGeneration. Passing the source is cheaper: when the GGUF files
    are already there, the 3B-parameter model is never built. Never raises: a missing or failing llama.cpp gives
    {"error": "<one line>"}.
    """
    lengths = sorted(set(lengths))
    peers = open_peers(model, max(lengths), threads, root, log)
    if "error" in peers:
        return peers
    try:
        result = peers["result"]
        for kind, peer in peers["peers"].items():
            for n in lengths:
                result["fill"][kind][n] = peer.fill(n)
                steps = [peer.step() for _ in range(WARMUP + STEPS)]
                result["steps_ms"][kind][n] = [round(t, 2) for t in steps]
                result[f"{kind}_ms"][n] = statistics.median(steps[WARMUP:])
        return close_peers(peers)
    except Exception as error:
        close_peers(peers)
        return {"error": _one_line(error)}


def open_peers(model, longest: int, threads: int = 0, root: Path = Path("build/bench/llama"), log=None,
               kinds=("f32", "q4_0"), base: str = "f32") -> dict:
    """The `kinds` GGUF files of `model` (converted to `base`, f32 or f16, then quantized; built once), each loaded
    in its own child process with a context for `longest` cached tokens and the logit check done:
    {"peers": {kind: Peer}, "result": the setup, sizes and logit checks, with empty per-length tables}, or
    {"error": one line}. Close with `close_peers`. f16 is for models whose F32 file would not fit (the whole 4B:
    16 GB of F32 on a 24 GB machine); its weights are the model's rounded to fp16."""
    log = log or (lambda message: print(message, flush=True))
    threads = threads or os.cpu_count()
    try:
        try:
            from importlib.metadata import version

            llama_version = version("llama-cpp-python")
        except Exception:
            raise RuntimeError("llama-cpp-python is not installed (pip install llama-cpp-python)") from None
        files = _build(model, Path(root).resolve(), threads, llama_version, log, base)
    except Exception as error:  # the bench reports the peer as missing and goes on
        return {"error": _one_line(error)}
    result = {"setup": {"llama_cpp_python": llama_version, "llama_cpp_commit": files["commit"], "threads": threads,
                        "n_batch": N_BATCH, "n_ubatch": N_BATCH, "steps": STEPS, "warmup": WARMUP,
                        "converter": f"convert_hf_to_gguf.py --outtype {base} (Qwen3VLForConditionalGeneration -> "
                                     "arch qwen3vl), then llama_model_quantize",
                        "prompt_tokens": PROMPT_TOKENS},
              "gguf_bytes": {}, "rss": {}, "fill": {}, "steps_ms": {}, "tensor_types": {}, "logit_check": {}}
    peers = {}
    try:
        for kind in kinds:
            log(f"llama.cpp {kind}: loading, logit check")
            peers[kind] = Peer(files[kind], threads, longest + 256, files["dir"] / f"logits-{kind}.npy",
                               files["dir"] / f"llama-{kind}.log")
            result["setup"].update(peers[kind].info["setup"])  # the same for both: system info, flash attention
            result["rss"][kind] = peers[kind].info["rss"]
            result["gguf_bytes"][kind] = files[kind].stat().st_size
            result["logit_check"][kind] = _compare(files["reference"], files["dir"] / f"logits-{kind}.npy")
            result[f"{kind}_ms"], result["fill"][kind], result["steps_ms"][kind] = {}, {}, {}
    except Exception as error:
        for peer in peers.values():
            peer.close()
        return {"error": _one_line(error)}
    return {"peers": peers, "result": result}


def close_peers(peers: dict) -> dict:
    """Ends the children; returns the result with their last resident memory and the tensor types they loaded."""
    result = peers["result"]
    for kind, peer in peers["peers"].items():
        last = peer.close()
        if last:
            result["rss"][kind]["after_decode"] = last["rss"]
            result["tensor_types"][kind] = last["tensor_types"]
    return result


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip(": ")


class Peer:
    """One GGUF loaded by llama.cpp in a child process, its cache filled and stepped on command."""

    def __init__(self, path: Path, threads: int, n_ctx: int, logits_file: Path, log_file: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.llama_cpp", "--worker", "serve", str(path), "--threads", str(threads),
             "--n-ctx", str(n_ctx), "--logits", str(logits_file), "--log", str(log_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.info = self._reply("load")

    def fill(self, n: int) -> dict:
        """The cache to exactly `n` tokens (dropping the end or decoding more): seconds and tokens decoded."""
        return self._ask({"do": "fill", "n": n})

    def step(self) -> float:
        """ms of one decode step onto the cache (the new token is then dropped: the cache stays at its length)."""
        return self._ask({"do": "step"})["ms"]

    def prefill(self, k: int) -> float:
        """ms of `k` new tokens onto the cache, in batches of N_BATCH (then dropped again)."""
        return self._ask({"do": "prefill", "k": k})["ms"]

    def close(self) -> dict | None:
        if self.proc.poll() is not None:
            return None
        try:
            return self._ask({"do": "close"})
        except RuntimeError:
            return None
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def _ask(self, command: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _reply says why
        return self._reply(command["do"])

    def _reply(self, what: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(WORKER_MARK):
                return json.loads(line[len(WORKER_MARK):])
        self.proc.wait()
        lines = [line for line in self.proc.stderr.read().splitlines() if line.strip()]
        raise RuntimeError(f"llama.cpp worker died at {what} (exit {self.proc.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")


def _compare(reference_file: Path, logits_file: Path) -> dict:
    """How far llama.cpp's prompt logits are from transformers', in absolute terms and against the logit scale.
    For F32 this is the proof of the same model; for Q4_0 it is what quantization costs."""
    import numpy as np

    ref = np.load(reference_file).astype(np.float64)
    got = np.load(logits_file).astype(np.float64)  # [exact or default context, token, vocab]
    scale = float(np.abs(ref).max())
    check = {"tokens": ref.shape[0], "ref_max_abs": scale,
             "argmax_agree": int((got[0].argmax(-1) == ref.argmax(-1)).sum())}
    # "exact" (F32 cache, no flash attention) is the identity check; "default" is what llama.cpp's defaults give:
    # an F16 cache, and flash attention, which rounds to F16 inside.
    for name, logits in zip(("exact", "default"), got):
        diff = float(np.abs(logits - ref).max())
        check[f"max_abs_diff_{name}"] = diff
        check[f"rel_diff_{name}"] = diff / scale
    return check


# --- building the GGUF files (parent process) ---

def _build(model, root: Path, threads: int, llama_version: str, log, base: str = "f32") -> dict:
    """The `base` (F32 or F16) and Q4_0 GGUF files and transformers' prompt logits, made once per set of
    weights."""
    key = _key(model)
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    files = {"dir": folder, base: folder / f"model-{base}.gguf", "q4_0": folder / "model-q4_0.gguf",
             "reference": folder / "reference-logits.npy"}
    commit = root / "src" / f"llama-cpp-python-{llama_version}" / "commit"
    if not (files[base].exists() and files["reference"].exists()):
        hf = _hf_model(model)
        if not files["reference"].exists():
            _save_atomic(files["reference"], _reference_logits(hf))
        if not files[base].exists():
            hf_dir = folder / "hf"
            log(f"llama.cpp: saving the model to {hf_dir} and converting it to GGUF {base.upper()}")
            if base == "f16":
                import torch

                hf.to(torch.float16)  # half the bytes on disk; the converter writes them as they are
            _save_hf(hf, hf_dir)
            del hf  # the converter reads the saved folder; the 3B-parameter model need not stay in memory
            converter = _converter(root, llama_version, log)
            tmp = files[base].with_suffix(".tmp")
            _run([sys.executable, str(converter), str(hf_dir), "--outtype", base, "--outfile", str(tmp)],
                 "convert_hf_to_gguf.py")
            tmp.rename(files[base])
            shutil.rmtree(hf_dir)  # gigabytes that nothing reads again: the GGUF is what is kept
    if not files["q4_0"].exists():
        log(f"llama.cpp: quantizing {base.upper()} to Q4_0")
        tmp = files["q4_0"].with_suffix(".tmp")
        _worker(["quantize", str(files[base]), str(tmp), "--threads", str(threads)])
        tmp.rename(files["q4_0"])
    files["commit"] = commit.read_text().strip() if commit.exists() else "unknown"
    return files


def _key(model) -> str:
    """Names the weights: the source's identity (config hash and seed), or a built model's config and values."""
    if isinstance(model, (str, Path)):
        from export.load import resolve

        identity = resolve(str(model), random_weights=True).identity
    else:  # a few values of every tensor tell seeds and checkpoints apart without hashing gigabytes
        digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[:64].float().numpy().tobytes())
        identity = digest.hexdigest()
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _hf_model(model):
    if isinstance(model, (str, Path)):
        from export.load import resolve

        return resolve(str(model), random_weights=True).build_model()
    return model


def _prompt() -> list[int]:
    return _tokens(PROMPT_TOKENS)


def _tokens(n: int) -> list[int]:
    """Seeded token ids below the real vocabulary (151643 tokens): the fill, whose first ids are the prompt."""
    import numpy as np

    return np.random.default_rng(SEED).integers(0, 151643, size=n).tolist()


def _reference_logits(hf):
    import torch

    # Text only, so transformers gives every token equal t/h/w positions 0..15: what llama.cpp does for tokens.
    with torch.no_grad():
        return hf(input_ids=torch.tensor([_prompt()])).logits[0].float().numpy()


def _save_hf(hf, folder: Path) -> None:
    """The model as a Hugging Face folder: config and safetensors weights, plus the real Qwen tokenizer files,
    which the converter needs to write the vocabulary (their content does not touch the logits)."""
    from export.load import resolve

    if folder.exists():
        shutil.rmtree(folder)
    hf.save_pretrained(folder, safe_serialization=True)
    for name, path in resolve("Qwen3-VL-4B", random_weights=True).tokenizer_files().items():
        shutil.copy(path, folder / name)


def _save_atomic(path: Path, array) -> None:
    import numpy as np

    with open(path.with_suffix(".tmp"), "wb") as f:
        np.save(f, array)
    path.with_suffix(".tmp").rename(path)


def _converter(root: Path, llama_version: str, log) -> Path:
    """The converter of the installed version's llama.cpp: from $LLAMA_CPP_SRC, else the pip-downloaded sdist."""
    given = os.environ.get("LLAMA_CPP_SRC")
    if given and Path(given).is_dir():
        converter = Path(given) / "convert_hf_to_gguf.py"
        if not converter.is_file():
            raise RuntimeError(f"LLAMA_CPP_SRC={given} has no convert_hf_to_gguf.py")
        return converter
    unpacked = root / "src" / f"llama-cpp-python-{llama_version}"
    if not (unpacked / "done").exists():
        tarball = Path(given) if given else _download_sdist(root / "src", llama_version, log)
        _unpack(tarball, unpacked)
        if not given:
            tarball.unlink()  # the few files the converter needs are unpacked; the rest is never read
    return unpacked / "llama.cpp" / "convert_hf_to_gguf.py"


def _download_sdist(folder: Path, llama_version: str, log) -> Path:
    name = f"llama_cpp_python-{llama_version}.tar.gz"
    if not (folder / name).exists():
        log(f"llama.cpp: downloading the llama-cpp-python {llama_version} sdist for its converter")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", str(folder), f"llama-cpp-python=={llama_version}"], "pip download")
    return folder / name


def _unpack(tarball: Path, out: Path) -> None:
    """Only the converter, its modules and the vendored gguf-py (it puts that on its own sys.path first), and the
    llama.cpp commit the sdist pins."""
    wanted = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
    commit_file = ".git/modules/vendor/llama.cpp/HEAD"
    if out.exists():
        shutil.rmtree(out)
    (out / "llama.cpp").mkdir(parents=True)
    commit = "unknown"
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            inner = member.name.split("/", 1)[1] if "/" in member.name else ""
            if inner == commit_file:
                commit = tar.extractfile(member).read().decode().strip()
            elif member.isfile() and inner.startswith(wanted):
                target = out / "llama.cpp" / inner.removeprefix("vendor/llama.cpp/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if not (out / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{tarball} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    (out / "commit").write_text(commit)
    (out / "done").touch()


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}")
    return done.stdout


def _worker(args: list[str]) -> dict:
    out = _run([sys.executable, "-m", "bench.llama_cpp", "--worker", *args], f"llama.cpp worker {args[0]}")
    for line in reversed(out.splitlines()):
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    raise RuntimeError(f"llama.cpp worker {args[0]} printed no result")


# --- inside the child process: only llama_cpp and numpy ---

class _Log:
    """Collects llama.cpp's log lines instead of letting them flood the bench's output; what flash attention
    'auto' resolved to and the file's tensor types are read from them."""

    def __init__(self, llama):
        self.lines = []

        @llama.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode(errors="replace"))

        self.callback = callback  # keep a reference: llama.cpp holds only the C pointer
        llama.llama_log_set(callback, None)

    def text(self) -> str:
        return "".join(self.lines)


def _rss() -> dict:
    """This process's resident memory now and at its peak, in bytes (Linux)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return {"now": fields.get("VmRSS"), "peak": fields.get("VmHWM")}


def _quantize(src: str, dst: str, threads: int) -> dict:
    import llama_cpp as llama

    _Log(llama)
    params = llama.llama_model_quantize_default_params()
    # Q4_0 with llama.cpp's own exceptions, as its quantize tool makes it: norms stay F32, and the tied
    # embedding, which is also the output matrix, gets Q6_K.
    params.ftype = llama.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    status = llama.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize returned {status}")
    return {}


class _Session:
    """One model and one context, fed through a reusable batch: the low-level API, so that every llama_decode is
    exactly the call being timed (one chunk of the fill, or one new token)."""

    def __init__(self, llama, model, n_ctx: int, threads: int, exact: bool = False):
        """llama.cpp's default context (F16 cache, flash attention auto), or with `exact` one where nothing is
        rounded to F16: an F32 cache and no flash attention (the CPU kernel rounds Q, K and V to F16 even with an
        F32 cache)."""
        self.llama = llama
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, N_BATCH, N_BATCH
        params.n_threads = params.n_threads_batch = threads
        if exact:
            params.type_k = params.type_v = llama.GGML_TYPE_F32
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = llama.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))

    def decode(self, tokens: list[int], start: int, logits: str = "last") -> None:
        """Tokens at positions start.. (one sequence); logits for the last token or for all of them."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = token, start + i, 1, 0
            b.logits[i] = logits == "all" or i == len(tokens) - 1
        status = self.llama.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} at position {start}")
        self.llama.llama_synchronize(self.ctx)

    def logits(self, i: int):
        import numpy as np

        return np.ctypeslib.as_array(self.llama.llama_get_logits_ith(self.ctx, i), (self.n_vocab,)).copy()

    def forget_from(self, position: int) -> None:
        """Drop cached tokens at `position` and later, so the next fill continues where the timed steps began."""
        self.llama.llama_memory_seq_rm(self.llama.llama_get_memory(self.ctx), 0, position, -1)

    def close(self) -> None:
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)


def _serve(path: str, threads: int, n_ctx: int, logits_file: str, log_file: str) -> None:
    """The child's side of a `Peer`: load, check the prompt's logits, answer one JSON line per command."""
    import numpy as np

    import llama_cpp as llama

    log = _Log(llama)
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(path.encode(), llama.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama_model_load_from_file failed for {path}")
    rss = {"model_loaded": _rss()["now"]}
    prompt = _prompt()

    # The logit check: the prompt's logits with nothing rounded to F16 (the model itself) ...
    check = _Session(llama, model, 256, threads, exact=True)
    check.decode(prompt, 0, logits="all")
    exact = np.stack([check.logits(i) for i in range(len(prompt))])
    check.close()

    # ... and the timing context, llama.cpp's defaults (F16 cache, flash attention auto), whose fill starts with
    # the same prompt, so the logits a default user gets come for free.
    session = _Session(llama, model, n_ctx, threads)
    rss["context"] = _rss()["now"]
    tokens = _tokens(n_ctx)
    session.decode(prompt, 0, logits="all")
    default = np.stack([session.logits(i) for i in range(len(prompt))])
    np.save(logits_file, np.stack([exact, default]).astype(np.float32))
    position = len(prompt)

    def answer(result: dict) -> None:
        print(WORKER_MARK + json.dumps(result), flush=True)

    def timed(new: list[int]) -> float:
        """ms to decode `new` at the cache's end, then forget them: the cache keeps its length."""
        start = time.perf_counter()
        for i in range(0, len(new), N_BATCH):
            session.decode(new[i:i + N_BATCH], position + i)
        session.logits(-1)  # the last token's, as a generating user would read them
        ms = (time.perf_counter() - start) * 1e3
        session.forget_from(position)
        return ms

    answer({"rss": rss, "setup": {"system_info": llama.llama_print_system_info().decode().strip(),
                                  "flash_attn": _flash_attention(log.text()), "kv_cache": "f16 (default)",
                                  "n_ctx": n_ctx}})
    for line in sys.stdin:
        command = json.loads(line)
        if command["do"] == "fill":
            n, start, begin = command["n"], time.perf_counter(), position
            if position > n:
                session.forget_from(n)
                position = n
            while position < n:
                chunk = tokens[position:min(n, position + N_BATCH)]
                session.decode(chunk, position)
                position += len(chunk)
            answer({"seconds": round(time.perf_counter() - start, 3), "tokens": position - begin})
        elif command["do"] == "step":
            answer({"ms": timed(tokens[position:position + 1])})
        elif command["do"] == "prefill":
            answer({"ms": timed(tokens[position:position + command["k"]])})
        elif command["do"] == "close":
            text = log.text()
            Path(log_file).write_text(text)  # llama.cpp's own account of the load and the contexts
            answer({"rss": _rss(), "tensor_types": _tensor_types(text)})
            break
    session.close()


def _flash_attention(log_text: str) -> str:
    """What llama.cpp's 'auto' resolved to, from its log."""
    if "Flash Attention enabled" in log_text:
        return "auto -> enabled"
    if "Flash Attention not supported" in log_text:
        return "auto -> disabled"
    return "auto (resolution not logged)"


def _tensor_types(log_text: str) -> dict:
    """The loader's 'type q4_0: N tensors' lines: which types the file really holds (Q4_0 keeps some matrices
    at higher precision by llama.cpp's own rules)."""
    types = {}
    for line in log_text.splitlines():
        if "- type " in line and "tensors" in line:
            name, count = line.split("- type ", 1)[1].split(":")
            types[name.strip()] = int(count.split()[0])
    return types


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_cpp --worker")
    p.add_argument("mode", choices=["serve", "quantize"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n-ctx", type=int)
    p.add_argument("--logits")
    p.add_argument("--log")
    args = p.parse_args(argv)
    if args.mode == "quantize":
        print(WORKER_MARK + json.dumps(_quantize(*args.paths, args.threads)), flush=True)
    else:
        _serve(args.paths[0], args.threads, args.n_ctx, args.logits, args.log)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.llama_cpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = all cores)")
    p.add_argument("--root", default="build/bench/llama", help="where the GGUF files are kept between runs")
    p.add_argument("--model", help="an export.load source (random weights); default: the bench's wide model")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if args.model is None:
        from .models import wide_folder

        args.model = str(wide_folder(Path("build/bench")))
    result = peer_rows(args.model, args.lengths, args.threads, Path(args.root))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    for kind in ("f32", "q4_0"):
        for n, ms in result.get(f"{kind}_ms", {}).items():
            print(f"{kind:5} {n:>6} cached: {ms:8.1f} ms/token  {1e3 / ms:6.1f} tokens/s")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
