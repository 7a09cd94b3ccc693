"""The model card attached to every registered version: what the model is for, what it was
trained and tested on, how good it is (with intervals), how calibrated, for whom it works
less well, and what it cannot do."""

from __future__ import annotations

from typing import Any

import pandas as pd

from skinml.core.clinical import SEXES, SITES
from skinml.core.labels import CLASSES, DIAGNOSES
from skinml.evaluation.metrics import Interval
from skinml.evaluation.reports import metrics_markdown, table_markdown


def card_file(version: str) -> str:
    """Every version gets its own card: two versions of one run have different gates."""
    return f"model_card_v{version}.md"


def record_file(version: str) -> str:
    """The version's record (JSON: its gate and provenance), beside its card; versions of one
    run share a logged model, so the name carries the version."""
    return f"version_v{version}.json"


def _inputs_section(metadata: str, dropout: str) -> list[str]:
    """What a client sends: the image, and for a fusion model the optional metadata."""
    if metadata == "none":
        return ["- Input: column `image` (base64 JPEG or PNG); the image alone."]
    return [f"- Input: column `image` (base64 JPEG or PNG), and optional columns `age` "
            f"(years, 0-120), `sex` ({', '.join(SEXES)}) and `localization` (body site: "
            f"{', '.join(SITES)}), fused with the image features (`{metadata}`). A missing "
            "column or value (null, \"\", \"unknown\") is \"not recorded\"; the model was "
            f"trained with each field hidden at random (p = {dropout}) so it answers without "
            "them, as with every value missing."]


def render(name: str, version: str, params: dict[str, str], metrics: dict[str, float],
           subgroups: pd.DataFrame | None, split_counts: pd.DataFrame | None,
           record: dict[str, Any]) -> str:
    """Markdown text of the card, from a training run's record and the version's record
    (`gate` and `provenance`, as in `version_vN.json`)."""
    test = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")}
    run_id, run_name = record["provenance"]["run_id"], record["provenance"]["run_name"]
    p = params.get
    temperature = (f"T = {test['temperature']:.3f}" if "temperature" in test
                   else "not recorded for this run")
    sections = [
        f"# Model card: {name} version {version}",
        "## Model",
        f"- Architecture: {p('model.arch', '?')}, input {p('model.image_size', '?')} px "
        f"(resize to image_size / {p('model.crop_pct', '?')}, centre crop), "
        f"ImageNet weights: {p('model.pretrained', '?')}.",
        f"- Trained in MLflow run `{run_id}` ({run_name}); balancing "
        f"`{params.get('balance.strategy', '?')}`, {params.get('optim.epochs', '?')} epochs, "
        f"best epoch {int(metrics.get('best_epoch', 0))}.",
        *_inputs_section(p("model.metadata", "none"), p("model.metadata_dropout", "?")),
        "- Output: probabilities for " + ", ".join(f"{c} ({DIAGNOSES[c]})" for c in CLASSES)
        + f"; temperature-scaled on the validation split ({temperature}).",
        "## Intended use",
        "- Research on automated classification of **dermoscopic** images of pigmented skin "
        "lesions: benchmarking, method development, teaching.",
        "## Not intended for",
        "- Diagnosis, triage or any clinical decision: this is not a medical device and has "
        "not been validated as one.",
        "- Clinical (non-dermoscopic) photographs, images of other body sites or modalities, "
        "and lesion types outside the seven HAM10000 classes.",
        "## Training data and split",
        f"- HAM10000 folder `{params.get('data.dir') or 'bundled 660-image sample'}`, split by "
        f"lesion (no lesion in two splits), stratified by diagnosis: val fraction "
        f"{params.get('data.val_frac', '?')}, test fraction {params.get('data.test_frac', '?')}, "
        f"split seed {params.get('data.split_seed', '?')}.",
    ]
    if split_counts is not None:
        sections.append(table_markdown(split_counts.reset_index(), "{:.0f}"))
    sections += ["## Test metrics (lesion-grouped test split)"]
    if "balanced_accuracy" in test and "auc" in test:
        sections.append(metrics_markdown(test, "test"))
    else:
        sections.append("No test metrics were recorded for this run.")
    sections += ["## Promotion gate", *_gate_section(version, record["gate"])]
    sections += ["## Provenance", *_provenance_section(version, record["provenance"])]
    sections += _subgroup_section(subgroups)
    sections += [
        "## Known limitations",
        "- Dermoscopic images only; accuracy on smartphone or clinical photographs is unknown.",
        "- HAM10000 comes from two sites (Vienna, Queensland) and mostly light skin types; "
        "performance on darker skin (Fitzpatrick IV-VI) is not established.",
        "- Class imbalance: nv is two thirds of the data; rare classes (df, vasc) have few "
        "test lesions, so their numbers carry wide uncertainty.",
        "- No external validation unless an evaluation run on another data set says "
        "otherwise (`skinml evaluate`).",
    ]
    return "\n\n".join(sections) + "\n"


def _subgroup_section(subgroups: pd.DataFrame | None) -> list[str]:
    """Balanced accuracy and key sensitivities per sex, age band and body site."""
    sections = ["## Subgroups",
                "Balanced accuracy and per-class sensitivity by sex, age band and body site; "
                "groups with fewer than 30 images are marked small: their numbers are "
                "unreliable, not hidden."]
    if subgroups is None:
        return [*sections, "No subgroup table was recorded for this run."]
    columns = ["attribute", "group", "images", "small", "balanced_accuracy",
               "sensitivity_mel", "sensitivity_bcc", "sensitivity_nv"]
    return [*sections, table_markdown(subgroups[[c for c in columns if c in subgroups]])]


def _gate_section(version: str, gate: dict[str, Any]) -> list[str]:
    """How this version was judged against the champion (from its gate record)."""
    lines = [f"**{gate['decision']}**: {gate['reason']}",
             f"The full record is `{record_file(version)}`, beside this card."]
    judged = gate["comparison"]
    if judged is None:
        return lines
    accuracy = {k: _interval(v) for k, v in judged["balanced_accuracy"].items()}
    image_set = judged["set"]
    champion = f"champion version {gate['champion']['version']}"
    rows = [("compared with", f"{champion} (run `{gate['champion']['run_id']}`)"),
            ("gate set", f"{image_set['images']} images, {image_set['lesions']} lesions: "
                         f"{image_set['description']}"),
            ("gate set digest (SHA-256)", f"`{image_set['digest']}`"),
            ("balanced accuracy, this version", str(accuracy["challenger"])),
            (f"balanced accuracy, {champion}", str(accuracy["champion"])),
            ("Δ = this version - champion", accuracy["delta"].signed()),
            ("rule", f"promote when the lower end of the 95 % CI of Δ is above "
                     f"{gate['min_delta']:+.3f}; paired bootstrap over lesions (the same "
                     f"lesions for both models each round), {judged['rounds']} rounds, seed "
                     f"{judged['seed']}")]
    return lines + ["| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)]


def _provenance_section(version: str, provenance: dict[str, Any]) -> list[str]:
    """Where this version came from (`provenance` in its record)."""
    test = provenance["test_reported_only"]
    rows = [("MLflow run", f"`{provenance['run_id']}` ({provenance['run_name']})"),
            ("architecture", provenance["arch"] or "not recorded"),
            ("git commit", f"`{provenance['git_commit']}`" if provenance["git_commit"]
             else "not recorded"),
            ("split seed", provenance["split_seed"] or "not recorded"),
            *((f"data digest, {name}", f"`{digest}`")
              for name, digest in provenance["datasets"].items()),
            ("validation balanced accuracy (selection metric)",
             _shown(provenance["val_balanced_accuracy"])),
            ("test balanced accuracy (reported only)", _shown(test["balanced_accuracy"])),
            ("test macro AUC (reported only)", _shown(test["auc"]))]
    return [f"From `provenance` in `{record_file(version)}`; test numbers are reported, "
            "never used to choose or compare versions.",
            "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)]


def _interval(values: dict[str, float]) -> Interval:
    return Interval(values["value"], values["ci_low"], values["ci_high"])


def _shown(values: dict[str, float] | None) -> str:
    """A recorded metric with its interval, or what is missing."""
    if values is None:
        return "not recorded"
    return str(_interval(values)) if "ci_low" in values else f"{values['value']:.3f}"
