"""Model cards for compressed checkpoints and pushing them to the Hub (through the real huggingface_hub client).

A checkpoint publishes from either record of its run: ``fibration_report.json`` (written by the CLI) or the
``quantization_config`` in config.json (written by ``save_pretrained`` after ``compress_pretrained``). The card
and the plot are built in a temporary folder: ``push`` never writes into the checkpoint directory.
"""

from __future__ import annotations

import json
import math
import shlex
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from torch import nn

from hf_fibration.integrations.checkpoint_io import hub_id_of, is_hub_id
from hf_fibration.integrations.run_record import REPORT_FILE, RunRecord

CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "fibration.md"
PLOT_FILE = "fibration_layers.png"
TASK_TYPES = {"seq2seq": "translation", "causal": "text-generation", "masked": "fill-mask",
              "fidelity": "feature-extraction"}
AUTO_CLASSES = {"seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM",
                "masked": "AutoModelForMaskedLM", "fidelity": "AutoModel"}
# The eval data packaged with hf-fibration (used when a run names no dataset): samples of these splits.
PACKAGED_DATA = {"seq2seq": ("bentrevett/multi30k", None, "validation", "Multi30k de-en validation (sample)"),
                 "default": ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation",
                             "WikiText-2 validation (sample)")}
PUSH_HINTS = {401: "check the token (--token, HF_TOKEN or `hf auth login`)",
              403: "the token may not write there: use a write token or a namespace you own",
              404: "check the repo id and that its namespace exists and the token may write to it"}


class PushError(RuntimeError):
    """The Hub refused or failed the upload; the local checkpoint is untouched."""


def task_of_config(config: dict[str, Any]) -> str:
    """The task of a saved model from its config.json (the class names it was saved from)."""
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    names = config.get("architectures") or []
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal"
    if any(n.endswith("ForMaskedLM") for n in names):
        return "masked"
    return "fidelity"


# The fidelity task's loss is 1 − cos between mean-pooled embeddings; every other task's is a cross-entropy.
FIDELITY_LABEL = "1 − cos to the base model's embeddings"


def base_card(source: str | None) -> dict[str, Any]:
    """license, language and datasets from the base model's own card (a local README.md, else the Hub's, when
    reachable): the compressed model inherits the base's license and what it was trained on."""
    if not source:
        return {}
    path = Path(source).expanduser() / "README.md"
    try:
        card = ModelCard.load(path) if path.is_file() else ModelCard.load(source) if is_hub_id(source) else None
    except Exception:  # offline, gated, no card: the fields stay unknown
        return {}
    if card is None:
        return {}
    data = card.data.to_dict()
    return {k: data[k] for k in ("license", "license_name", "license_link", "language", "datasets") if data.get(k)}


def _metric_label(task: str, name: str) -> str:
    return FIDELITY_LABEL if task == "fidelity" and name == "loss" else name


def read_record(directory: str | Path) -> RunRecord:
    """The run's record: fibration_report.json, else one rebuilt from config.json's quantization_config."""
    directory = Path(directory)
    record = RunRecord.load(directory)
    if record is not None:
        return record
    not_ours = (f"{directory} is not a checkpoint compressed by hf-fibration (no {REPORT_FILE} and no fibration "
                f"quantization_config in config.json); compress it first: hf-fibration compress {directory}")
    if not directory.is_dir():
        raise ValueError(f"No such local directory: {directory}; pass a directory written by hf-fibration.")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        raise ValueError(not_ours) from None
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fibration":
        raise ValueError(not_ours)
    report = dict(quant.get("report") or {})
    report.setdefault("layers", [])
    return RunRecord(base_model=hub_id_of(quant.get("base_model")), source=quant.get("base_model"),
                     task=task_of_config(config), config=quant.get("fibration") or {}, report=report)


def plot_layers(record: RunRecord, path: Path) -> bool:
    """Bar plot of the fraction of units kept per layer; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = record.report.get("layers") or []
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 3.2))
    fig.set_size_inches(max(7, 0.3 * len(layers)), 5)
    ax.bar(range(len(layers)), [la["units_after"] / la["units_before"] for la in layers], color="tab:red")
    ax.set_ylabel("fraction of units kept", fontsize=12)
    ax.set_xlabel("layer", fontsize=12)
    ax.set_xticks(range(len(layers)), [la["name"].split(".", 1)[-1] for la in layers], rotation=90, fontsize=9)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def short_command(command: str | None) -> str:
    """The command with local paths shortened to their last component (no home or install paths on the Hub)."""
    if not command:
        return ""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    out = []
    for word in words:
        flag, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
        if ("/" in value or "\\" in value) and not is_hub_id(value):
            value = "./" + Path(value.rstrip("/\\")).name
        out.append(shlex.quote(flag + eq + value) if flag else shlex.quote(value))
    return " ".join(out)


def _dataset(record: RunRecord, task: str) -> tuple[str, str | None, str | None, str, list[str] | None]:
    """(type, config, split, name, card datasets) of the eval data: hub ids only, never local paths."""
    dataset, split = record.dataset, record.split
    if dataset and is_hub_id(dataset):
        return dataset, record.dataset_config, split, dataset, [dataset]
    if dataset:
        return "custom", None, split, f"local data ({Path(str(dataset)).name})", None
    ds_type, ds_config, ds_split, name = PACKAGED_DATA["seq2seq" if task == "seq2seq" else "default"]
    return ds_type, ds_config, ds_split, name, None


def _metrics(record: RunRecord) -> dict[str, dict[str, float]]:
    """Before/after metrics of the record; the report's losses when the run recorded no metrics (API path)."""
    metrics, report = record.metrics, record.report
    if not metrics.get("after") and report.get("holdout_final_loss") is not None:  # data the search never saw
        metrics = {"before": {"loss": report.get("holdout_base_loss")},
                   "after": {"loss": report["holdout_final_loss"]}}
    elif not metrics.get("after") and report.get("final_loss") is not None:
        metrics = {"before": {"loss": report.get("base_loss")}, "after": {"loss": report["final_loss"]}}
    return metrics


def eval_results(record: RunRecord) -> list[EvalResult]:
    """Model-index entries for every task, with and without a recorded dataset (finite values only)."""
    task = record.task or "fidelity"
    ds_type, ds_config, ds_split, ds_name, _ = _dataset(record, task)
    metrics = _metrics(record)
    results = []
    for key, stage in (("before", "uncompressed"), ("after", "compressed")):
        for name, value in (metrics.get(key) or {}).items():
            if value is None or not math.isfinite(float(value)):
                continue
            results.append(EvalResult(
                task_type=TASK_TYPES[task], dataset_type=ds_type, dataset_name=ds_name, dataset_config=ds_config,
                dataset_split=ds_split, metric_value=float(value),
                metric_name=f"{_metric_label(task, name)} ({stage})",
                metric_type="cosine_distance" if task == "fidelity" and name == "loss" else name))
    return results


def build_card(record: RunRecord, repo_id: str, plot: str | None = None, base_model: str | None = None
               ) -> ModelCard:
    """The model card: YAML metadata the Hub validates (base_model a hub id or absent), tables, how to load."""
    report, task = record.report, record.task or "fidelity"
    base_id = base_model or hub_id_of(record.base_model) or hub_id_of(record.source)
    metrics = _metrics(record)
    results = eval_results(record)
    sentence_transformers = record.sentence_transformers
    tags = ["hf-fibration", "fibration", "compression", "structured-compression"]
    inherited = record.base_card
    ds_type = _dataset(record, task)[0]
    datasets = list(dict.fromkeys([*(inherited.get("datasets") or []), *([ds_type] if ds_type != "custom" else [])]))
    card_data = ModelCardData(
        # The Hub's relations are adapter, merge, quantized and finetune. Fibration collapses units (rows averaged,
        # consumer columns summed and refit on data, optionally retuned): new weights derived from the base's, of
        # other shapes, in full precision — not a quantization (no lower-precision copy of the same weights), not
        # a merge of several models, not an adapter on top of the base. Of the four, "finetune" is the honest one.
        base_model=base_id, base_model_relation="finetune" if base_id else None,
        library_name="sentence-transformers" if sentence_transformers else "transformers",
        tags=tags + ["sentence-transformers", "sentence-similarity"] if sentence_transformers else tags,
        license=inherited.get("license"), license_name=inherited.get("license_name"),
        license_link=inherited.get("license_link"), language=inherited.get("language"), datasets=datasets or None,
        pipeline_tag=TASK_TYPES[task], model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
    )
    rows = [{"name": _metric_label(task, name), "before": _fmt((metrics.get("before") or {}).get(name)),
             "after": _fmt(value)} for name, value in (metrics.get("after") or {}).items()]
    before, after = report.get("params_before") or 0, report.get("params_after") or 0
    ne_before, ne_after = report.get("non_embedding_params_before"), report.get("non_embedding_params_after")
    described = base_id or (Path(record.source).name if record.source else "a model")
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        base_model=described, params_before=f"{before:,}" if before else "—", params_after=f"{after:,}",
        ratio=f"{before / max(after, 1):.2f}×" if before else "—",
        non_embedding_before=f"{ne_before:,}" if ne_before else "—",
        non_embedding_after=f"{ne_after:,}" if ne_after else "—",
        non_embedding_ratio=f"{ne_before / max(ne_after, 1):.2f}×" if ne_before and ne_after else "—",
        metrics=rows, auto_class=AUTO_CLASSES[task], command=short_command(record.command),
        loss_label=LOSS_LABELS[task], method=_method(record.config), layers=report.get("layers") or [],
        plot=plot, losses=_loss_lines(report), sentence_transformers=sentence_transformers,
    )


LOSS_LABELS = {"fidelity": f"{FIDELITY_LABEL} (1 − cosine between the mean-pooled, normalized embeddings of this "
                           "model and of the uncompressed one; 0 is identical)",
               "causal": "next-token cross-entropy", "masked": "masked-LM cross-entropy",
               "seq2seq": "teacher-forced cross-entropy on the targets"}


def _method(config: dict[str, Any]) -> str:
    """How the ε's were chosen, in the card's words."""
    if config.get("lossless"):
        return "Lossless: only units whose removal is exact were removed (no ε, no search)."
    if config.get("target_params") is not None:
        return f"Target size: {config['target_params']:g} of the non-embedding parameters, allocated by measured loss."
    if config.get("epsilon") is not None:
        return f"Fixed ε = {config['epsilon']:g} for every layer (no search)."
    return f"Searched: the largest ε per layer keeping the loss within τ = {config.get('tolerance')}."


def _loss_lines(report: dict[str, Any]) -> list[str]:
    """Where each loss was measured: the examples the search used, and the held-out ones it never saw."""
    lines = []
    searched = report.get("holdout_final_loss") is not None or report.get("search_examples")
    if report.get("final_loss") is not None and report.get("base_loss") is not None:
        where = f"the {report.get('search_examples') or ''} search examples" if searched else "the eval examples"
        lines.append(f"on {where.replace('  ', ' ')}: {report['base_loss']:.4f} → {report['final_loss']:.4f}")
    if report.get("holdout_final_loss") is not None and report.get("holdout_base_loss") is not None:
        lines.append(f"on {report.get('holdout_examples')} held-out examples the search never saw (the metrics "
                     f"above): {report['holdout_base_loss']:.4f} → {report['holdout_final_loss']:.4f}")
    return lines


def _fmt(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def write_card(directory: str | Path, repo_id: str, out_dir: str | Path, base_model: str | None = None
               ) -> ModelCard:
    """Write README.md (and the plot) for the checkpoint in ``directory`` into ``out_dir``."""
    out_dir = Path(out_dir)
    record = read_record(directory)
    record.sentence_transformers = (Path(directory) / "modules.json").is_file()
    plot = PLOT_FILE if plot_layers(record, out_dir / PLOT_FILE) else None
    card = build_card(record, repo_id, plot, base_model)
    card.save(out_dir / "README.md")
    return card


def _checkpoint_files(directory: Path) -> list[Path]:
    skip = {"README.md", PLOT_FILE}
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).parts[0] not in skip
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _push_failure(repo_id: str, err: Exception) -> PushError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    hint = PUSH_HINTS.get(status) or ("the Hub had a server error; retry later" if status and status >= 500 else
                                      "check the connection and HF_ENDPOINT, then retry")
    return PushError(f"Push to {repo_id} failed ({first}); {hint}. Nothing local was changed.")


def push_to_hub(
    model_or_dir: str | Path | nn.Module,
    repo_id: str,
    *,
    tokenizer=None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
    commit_message: str = "Upload fibration-compressed model (hf-fibration)",
) -> str:
    """Upload a compressed checkpoint with its generated model card; returns the commit URL.

    ``model_or_dir`` is a directory (written by ``hf-fibration compress`` or ``save_pretrained``) or a model
    compressed by ``compress_pretrained`` (saved to a temporary folder first, with ``tokenizer`` if given).
    ``base_model`` (a hub id) overrides the recorded one. The token comes from ``token``, else the usual places
    (HF_TOKEN, the cached login). Nothing is written into the checkpoint directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is not a valid repo id; use 'user-or-org/name'.") from None
    if "/" not in repo_id:
        raise ValueError(f"Repo id {repo_id!r} needs a namespace: use 'user-or-org/{repo_id}'.")
    if base_model is not None and not is_hub_id(base_model):
        raise ValueError(f"--base-model {base_model!r} is not a hub model id; pass one like 'org/name'.")
    with tempfile.TemporaryDirectory(prefix="hf-fibration-push-") as scratch:
        scratch = Path(scratch)
        if isinstance(model_or_dir, nn.Module):
            if getattr(model_or_dir.config, "quantization_config", None) is None:
                raise ValueError("This model was not compressed; run hf_fibration.compress_pretrained first.")
            directory = scratch / "checkpoint"
            model_or_dir.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        else:
            directory = Path(model_or_dir)
        card_dir = scratch / "card"
        card_dir.mkdir()
        write_card(directory, repo_id, card_dir, base_model)
        operations = [CommitOperationAdd(str(p.relative_to(directory).as_posix()), str(p))
                      for p in _checkpoint_files(directory)]
        operations += [CommitOperationAdd(p.name, str(p)) for p in sorted(card_dir.iterdir())]
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        except Exception as err:  # any client or server failure: one line, with what to do
            raise _push_failure(repo_id, err) from None
    return str(getattr(info, "commit_url", info))


