"""Load a model and tokenizer by hub id or local path, with one-line errors, and save checkpoints atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn

from hf_fibration.integrations.checkpoint_io import is_hub_id, looks_like_path, safetensors_header
from hf_fibration.integrations.run_record import REPORT_FILE, RunRecord
from hf_fibration.models.architectures import architecture_for

TMP_MARK = ".tmp-"


def load_config(name_or_path: str) -> transformers.PretrainedConfig:
    path = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not path.exists():
        raise ValueError(f"No such local directory: {name_or_path}; check the path (a hub id looks like "
                         "'user-or-org/name').")
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"{name_or_path} has no config.json; pass a directory written by save_pretrained.")
    if path.is_dir():
        _check_dtype(path / "config.json")
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except AttributeError as err:  # transformers resolves config values with getattr(torch, ...)
        raise ValueError(f"Cannot read the config of {name_or_path!r} ({_first(err)}); check config.json's values "
                         "(dtype: float32, float16 or bfloat16).") from None
    except (OSError, ValueError) as err:
        where = "local directory" if path.exists() else "hub id (the Hub may be unreachable)"
        first = str(err).strip().splitlines()[0][:160]
        raise ValueError(f"Cannot load model {name_or_path!r} as a {where}: {first}") from None


def _check_dtype(config_file: Path) -> None:
    """config.json's dtype (or torch_dtype) must name a torch dtype; transformers fails with AttributeError."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return  # transformers says what is wrong with the file
    for key in ("dtype", "torch_dtype"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, str) and value != "auto" and not isinstance(getattr(torch, value, None), torch.dtype):
            raise ValueError(f"{config_file} has {key} {value!r}, not a torch dtype; set it to \"float32\", "
                             "\"float16\" or \"bfloat16\" (or delete the line).")


# --task, as `optimum-cli export` names them: the transformers class that loads each.
TASK_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                "masked-lm": "AutoModelForMaskedLM", "feature-extraction": "AutoModel"}
TASKS = ("auto", *TASK_CLASSES)
DECODER_TYPES = ("gpt2", "llama", "qwen2", "mistral")
SEQ2SEQ_TYPES = ("marian", "bart", "mbart")
# Weights of a head that a bare model would leave unused: never dropped silently.
HEAD_WEIGHTS = re.compile(r"^(?:lm_head|cls|final_logits_bias|score|classifier|qa_outputs)(?:\.|$)")


def weight_names(name_or_path: str) -> list[str] | None:
    """The tensor names a checkpoint's safetensors headers list (a local directory, or the Hub's metadata); None
    when they cannot be read (no safetensors, offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        return sorted(k for f in files for k in safetensors_header(f)) if files else None
    if not is_hub_id(name_or_path):
        return None
    try:
        from huggingface_hub import get_safetensors_metadata

        meta = get_safetensors_metadata(name_or_path)
    except Exception:  # offline, gated, no safetensors: the task falls back on the model type
        return None
    return sorted(k for f in meta.files_metadata.values() for k in f.tensors)


def task_of_class(name: str, config: transformers.PretrainedConfig) -> str:
    """The --task a transformers class name stands for (its own name when it is none of them)."""
    if getattr(config, "is_encoder_decoder", False) or name.endswith(("MTModel", "ForConditionalGeneration")):
        return "seq2seq-lm"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    return "feature-extraction" if name.endswith("Model") else name


def resolve_task(name_or_path: str, config: transformers.PretrainedConfig, task: str = "auto"
                 ) -> tuple[str, str]:
    """(task, why): what ``load_model`` loads ``name_or_path`` as. ``task`` other than 'auto' is taken as given;
    else config.json's ``architectures``; else, with none named, the head is inferred from the model type and the
    weight names (``lm_head.*`` or a decoder's prefixed weights: causal LM; seq2seq families: seq2seq LM;
    ``cls.predictions.*``: masked LM; otherwise the bare model)."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; pass --task {', '.join(TASKS)}.")
    if task != "auto":
        return task, "--task"
    for name in config.architectures or []:
        if getattr(transformers, name, None) is not None:
            return task_of_class(name, config), f"config.json architectures: {name}"
    model_type = config.model_type
    names = weight_names(name_or_path) or []
    source = "config.json names no architectures"
    if model_type in SEQ2SEQ_TYPES:
        return "seq2seq-lm", f"{source}; {model_type} is a seq2seq family"
    if model_type in DECODER_TYPES:
        prefix = "transformer." if model_type == "gpt2" else "model."
        if any(n.startswith("lm_head.") for n in names):
            return "causal-lm", f"{source}; the weights hold lm_head.*"
        if any(n.startswith(prefix) for n in names):
            return "causal-lm", f"{source}; the weights are a head model's ({prefix}*, head tied to the embedding)"
    if any(n.startswith("cls.predictions.") for n in names):
        return "masked-lm", f"{source}; the weights hold cls.predictions.*"
    heads = sorted({n.split(".")[0] for n in names if HEAD_WEIGHTS.match(n)})
    if heads:
        raise ValueError(f"{name_or_path}: config.json names no architectures and the weights hold a head "
                         f"({', '.join(h + '.*' for h in heads)}) of no task hf-fibration can infer; pass --task "
                         f"{', '.join(TASK_CLASSES)} or add \"architectures\" to config.json.")
    why = "no head weights" if names else "no weight names readable"
    return "feature-extraction", f"{source}; {why}: the bare model"


def model_class(config: transformers.PretrainedConfig, task: str = "auto") -> type:
    """The class that loads a model for ``task`` ('auto': config.json's architectures, else the bare model)."""
    if task != "auto":
        auto = getattr(transformers, TASK_CLASSES[task])
        if type(config) not in auto._model_mapping:
            raise ValueError(f"--task {task} does not exist for {config.model_type} models in transformers; pass "
                             "another --task (or auto).")
        return auto
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def resolve_device(device: str | None) -> torch.device:
    """The torch device to run on; one-line errors for devices this torch cannot use."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}; pass --device cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build has no usable CUDA; pass --device cpu (or "
                             "install a CUDA build of torch).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                             "pass a smaller index.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS (Apple-silicon GPU) is not available to this torch (it needs macOS "
                         "12.3+ on Apple silicon and a torch built with MPS); pass --device cpu.")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"--device {device}: no Intel XPU is available to this torch; pass --device cpu.")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"Unsupported device {device!r}; pass --device cpu, cuda or cuda:N.")
    return dev


def check_weight_files(name_or_path: str) -> None:
    """A truncated .safetensors file in a local directory fails here, in one line naming the cut-off module."""
    path = Path(name_or_path)
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            safetensors_header(file)


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None,
               task: str = "auto") -> nn.Module:
    """The model in eval mode, with the head ``resolve_task`` picks; refuses unsupported families and damaged files
    before loading any weights, and a load that would leave head weights (an untied LM head) unused."""
    dev = resolve_device(device)
    config = load_config(name_or_path)
    architecture_for(config.model_type)
    check_weight_files(name_or_path)
    task, _ = resolve_task(name_or_path, config, task)
    kwargs = {} if dtype is None else {"dtype": dtype}
    named = _named_class(config)
    cls = model_class(config, "auto" if named and task == task_of_class(named, config) else task)
    try:
        model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except Exception as err:  # safetensors and torch raise their own types for damaged files
        if isinstance(err, ValueError) or type(err).__name__ not in ("SafetensorError", "IndexError"):
            raise
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot read the weights of {name_or_path}: {first}; re-download or re-save them.") \
            from None
    dropped = sorted({k.split(".")[0] for k in info.get("unexpected_keys", ()) if HEAD_WEIGHTS.match(k)})
    if dropped:
        raise ValueError(f"Loading {name_or_path} as {task} ({type(model).__name__}) would drop its head weights "
                         f"({', '.join(d + '.*' for d in dropped)}); pass the --task of that head (e.g. --task "
                         "causal-lm).")
    return model.to(dev).eval()


def _named_class(config: transformers.PretrainedConfig) -> str:
    return next((n for n in config.architectures or [] if getattr(transformers, n, None) is not None), "")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "source.spm", "tokenizer.model", "sentencepiece.bpe.model")


def load_tokenizer(name_or_path: str):
    path = Path(name_or_path)
    if path.is_dir() and not any((path / f).exists() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer here (special tokens only) and every text would be <unk>
        raise ValueError(f"{name_or_path} holds no tokenizer files; save the tokenizer into the model directory "
                         "(tokenizer.save_pretrained).")
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot load a tokenizer for {name_or_path!r} ({first}); save the tokenizer into the "
                         "model directory (tokenizer.save_pretrained).") from None


def _owner_alive(tmp: Path) -> bool:
    match = re.search(re.escape(TMP_MARK) + r"(\d+)-", tmp.name)
    if match is None:
        return False  # written by an older version, which named no owner: nothing can still be using it
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output: Path) -> list[Path]:
    """Remove temp directories of ``output`` left by killed runs (those whose process is gone); returns them."""
    removed = []
    for tmp in sorted(output.parent.glob(f".{output.name}{TMP_MARK}*")):
        if tmp.is_dir() and not _owner_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        print(f"hf-fibration: removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} "
              f"left by interrupted runs: {', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


def is_fibration_output(path: Path) -> bool:
    """True for a directory written by hf-fibration (its record, or a fibration quantization_config)."""
    if (path / REPORT_FILE).is_file():
        return True
    try:
        quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == "fibration"


def check_output(output: str | os.PathLike, overwrite: bool = False, sources: tuple[str | None, ...] = ()) -> Path:
    """The resolved output directory, refused in one line before any work when writing it could lose data: a file,
    the input model itself, a directory holding the input or inside it, or — even with ``overwrite`` — an existing
    directory that is not an earlier hf-fibration output."""
    output = Path(output).expanduser().resolve()
    for above in (output, *output.parents):
        if above.exists():
            if not above.is_dir():
                where = "is an existing file" if above == output else f"lies under the file {above}"
                raise ValueError(f"--output {output} {where}; pass a directory path.")
            break
    for source in sources:
        src = Path(source).expanduser() if source else None
        if src is None or not src.exists():
            continue
        src = src.resolve()
        if output == src:
            raise ValueError(f"--output {output} is the input model; choose another --output (the input is never "
                             "replaced).")
        if output in src.parents:
            raise ValueError(f"--output {output} contains the input model {src}; choose an --output outside it.")
        if src in output.parents:
            raise ValueError(f"--output {output} lies inside the input model {src}; choose an --output outside it.")
    if output.exists():
        if not overwrite:
            raise ValueError(f"Output directory {output} exists; pass --overwrite or choose another --output.")
        if any(output.iterdir()) and not is_fibration_output(output):
            files = sum(1 for f in output.rglob("*") if f.is_file())
            raise ValueError(f"--overwrite would delete {output} ({files} files), which holds no hf-fibration "
                             "output; delete it yourself or choose another --output.")
    return output


@contextmanager
def atomic_directory(output: str | os.PathLike, overwrite: bool = False, sources: tuple[str | None, ...] = ()):
    """Yield a temp directory next to ``output``; it becomes ``output`` only if the block finishes.

    ``output`` is checked first (``check_output``: never the input, never a directory that is not an earlier
    hf-fibration output). The temp name carries the process id, so a later run removes the ones whose process was
    killed; a replaced output is renamed aside (under such a name) before the new one is renamed in. The directory
    is made with ``mkdir`` (the umask's mode), as any output folder would be."""
    output = check_output(output, overwrite, sources)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(output)
    stem = f".{output.name}{TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    tmp, old = output.parent / stem, output.parent / f"{stem}-replaced"
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Files of a source model that describe its (uncompressed) weights: never carried into a compressed output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx", ".gguf",
                   ".tflite", ".npz", ".pkl", ".pickle")
NOT_CARRIED = ("config.json", "README.md", REPORT_FILE, "model.safetensors.index.json",
               "pytorch_model.bin.index.json")


def _module_dirs(source: Path) -> set[str]:
    """The sentence-transformers module folders (1_Pooling, 2_Dense, ...) that modules.json names."""
    try:
        modules = json.loads((source / "modules.json").read_text())
    except (OSError, ValueError):
        return set()
    paths = {str(m.get("path") or "") for m in modules if isinstance(m, dict)} if isinstance(modules, list) else set()
    return {p.strip("/") for p in paths if p.strip("/") and "/" not in p.strip("/") and not p.startswith(".")}


def _source_directory(source: str) -> Path | None:
    """A local directory holding ``source``'s files: the path itself, or the Hub snapshot of its non-weight files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(source):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, ignore_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]
                                      + ["onnx/*", "openvino/*", "coreml/*"]))
    except Exception as err:  # offline, gated, removed: the checkpoint itself is still complete
        print(f"hf-fibration: warning: could not fetch the non-weight files of {source} ({_first(err)}); a "
              "sentence-transformers pipeline (modules.json, pooling, normalization) is not carried into the output.",
              file=sys.stderr)
        return None


def _first(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__


def carry_files(source: str | None, directory: Path) -> list[str]:
    """Copy the files of ``source`` its users rely on besides the weights into ``directory``; returns their names.

    That is every top-level file but the weights, config.json and README.md (the model card describes the
    compressed model, not the base), plus the sentence-transformers module folders named in modules.json
    (1_Pooling, 2_Dense with its own small weights, ...), so ``SentenceTransformer(output)`` runs the base's
    pipeline — pooling, normalization, max_seq_length — on the compressed transformer. Hidden files, exports of the
    uncompressed weights (onnx/, openvino/) and other folders (training checkpoints) stay behind. Run it before
    ``save_pretrained``: the files the model and tokenizer write replace the copies."""
    root = _source_directory(source) if source else None
    if root is None:
        return []
    carried = []
    modules = _module_dirs(root)
    for item in sorted(root.iterdir()):
        name = item.name
        if name.startswith(".") or name in NOT_CARRIED:
            continue
        if item.is_dir():
            if name in modules:
                shutil.copytree(item, directory / name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(".*"))
                carried.append(name + "/")
        elif item.is_file() and not name.lower().endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(item, directory / name)
            carried.append(name)
    return carried


def save_checkpoint(model: nn.Module, tokenizer, directory: Path, record: RunRecord | None = None,
                    source: str | None = None) -> None:
    """save_pretrained of the model and tokenizer, the run's record, and (first) the source's other files."""
    carry_files(source, directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if record is not None:
        record.save(directory)
