"""Model cards for compressed checkpoints and pushing them to the Hub (through the real huggingface_hub client)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "fibration.md"
REPORT_FILE = "fibration_report.json"
PLOT_FILE = "fibration_layers.png"
TASK_TYPES = {"seq2seq": "translation", "causal": "text-generation", "masked": "fill-mask",
              "fidelity": "feature-extraction"}
AUTO_CLASSES = {"seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM",
                "masked": "AutoModelForMaskedLM", "fidelity": "AutoModel"}


class PushError(RuntimeError):
    """The Hub refused or failed the upload; the local checkpoint is untouched."""


def read_record(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / REPORT_FILE
    if not path.exists():
        raise ValueError(f"{directory} has no {REPORT_FILE}; push directories written by `hf-fibration compress`.")
    return json.loads(path.read_text())


def plot_layers(record: dict[str, Any], path: Path) -> bool:
    """Bar plot of the fraction of units kept per layer; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = record["report"]["layers"]
    if not layers:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 3.2))
    ax.bar(range(len(layers)), [la["units_after"] / la["units_before"] for la in layers], color="tab:red")
    ax.set_ylabel("units kept")
    ax.set_xticks(range(len(layers)), [la["name"].split(".", 1)[-1] for la in layers], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_card(record: dict[str, Any], repo_id: str, plot: str | None = None) -> ModelCard:
    report, task = record["report"], record.get("task", "fidelity")
    base_model = record.get("base_model", "")
    metrics = record.get("metrics", {})
    eval_results = []
    for key, stage in (("before", "uncompressed"), ("after", "compressed")):
        for name, value in metrics.get(key, {}).items():
            eval_results.append(EvalResult(
                task_type=TASK_TYPES[task], dataset_type=record.get("dataset", "hf-fibration-eval"),
                dataset_name=record.get("dataset", "hf-fibration packaged eval set"), metric_type=name,
                metric_value=float(value), metric_name=f"{name} ({stage})"))
    if not eval_results and report.get("final_loss") is not None:
        for value, stage in ((report["base_loss"], "uncompressed"), (report["final_loss"], "compressed")):
            eval_results.append(EvalResult(
                task_type=TASK_TYPES[task], dataset_type="hf-fibration-eval", dataset_name="hf-fibration eval set",
                metric_type="loss", metric_value=float(value), metric_name=f"loss ({stage})"))
    card_data = ModelCardData(
        base_model=base_model if "/" in base_model else None,
        base_model_relation="quantized" if "/" in base_model else None,
        library_name="transformers", tags=["hf-fibration", "fibration", "compression", "structured-compression"],
        datasets=[record["dataset"]] if record.get("dataset") else None,
        model_name=repo_id, eval_results=eval_results or None,
    )
    rows = [{"name": name, "before": f"{metrics.get('before', {}).get(name, float('nan')):.4f}",
             "after": f"{value:.4f}"} for name, value in metrics.get("after", {}).items()]
    before, after = report["params_before"], report["params_after"]
    ne_before, ne_after = report.get("non_embedding_params_before"), report.get("non_embedding_params_after")
    return ModelCard.from_template(
        card_data, template_path=str(CARD_TEMPLATE), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        base_model=base_model, params_before=f"{before:,}", params_after=f"{after:,}",
        ratio=f"{before / max(after, 1):.2f}×", non_embedding_before=f"{ne_before:,}" if ne_before else "—",
        non_embedding_after=f"{ne_after:,}" if ne_after else "—",
        non_embedding_ratio=f"{ne_before / max(ne_after, 1):.2f}×" if ne_before and ne_after else "—",
        metrics=rows, auto_class=AUTO_CLASSES[task], command=record.get("command", ""), task=task,
        tolerance=record.get("config", {}).get("tolerance"), layers=report["layers"], plot=plot,
    )


def write_card(directory: str | Path, repo_id: str) -> ModelCard:
    directory = Path(directory)
    record = read_record(directory)
    plot = PLOT_FILE if plot_layers(record, directory / PLOT_FILE) else None
    card = build_card(record, repo_id, plot)
    card.save(directory / "README.md")
    return card


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload fibration-compressed model (hf-fibration)",
) -> str:
    """Create ``repo_id`` if needed and upload the checkpoint with its generated model card; returns the commit URL.

    The token comes from ``token``, else the usual places (HF_TOKEN, the cached login)."""
    directory = Path(directory)
    if "/" not in repo_id:
        raise ValueError(f"Repo id {repo_id!r} needs a namespace: use 'user-or-org/{repo_id}'.")
    write_card(directory, repo_id)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, revision=revision,
                                 commit_message=commit_message)
    except Exception as err:  # any client or server failure: report it in one line, keep the local files
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PushError(f"Push to {repo_id} failed ({first}); the local checkpoint in {directory} is intact.") \
            from None
    return str(info.commit_url) if hasattr(info, "commit_url") else str(info)
