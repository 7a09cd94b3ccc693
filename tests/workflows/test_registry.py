"""The promotion gate: selection reads validation, the champion moves only on a paired win
on the same images, and the decision is on the model version and in its model card."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from skinml.data.metadata import default_data_dir
from skinml.tracking.reader import logged_model_uri
from skinml.workflows import model_card
from skinml.workflows.registry import (
    CHALLENGER,
    CHAMPION,
    GateOptions,
    RegistryError,
    _judge,
    best_run,
    champion,
    gated,
    register_run,
)

from ..conftest import isolated_tracking, trained_store

# Every test here judges models the `runs` fixture trains (three runs, 20-23 s on 2 cores).
pytestmark = pytest.mark.slow

# The bundled sample (a 99-image test split) at 32 px: enough for a real difference.
SAMPLE = ["optim.batch_size=32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained model, a near-chance one (1 epoch, tiny lr) and one on another split."""
    trained = [[*SAMPLE, "optim.epochs=5", "optim.warmup_epochs=1"],
               [*SAMPLE, "optim.epochs=1", "optim.lr=1e-6", "optim.warmup_epochs=0"],
               [*SAMPLE, "optim.epochs=1", "optim.warmup_epochs=0", "data.split_seed=1"]]
    with trained_store(tmp_path_factory.mktemp("gate"), trained, lesions_per_class=None) as store:
        good, bad, other_split = (run.run_id for run in store.runs)
        yield {"uri": store.uri, "root": store.root, "store": store, "good": good, "bad": bad,
               "other_split": other_split}


def aliases(uri: str, name: str) -> tuple[str | None, str | None]:
    client = mlflow.MlflowClient(uri)
    current = champion(client, name)
    return (str(current.version) if current else None,
            str(client.get_model_version_by_alias(name, CHALLENGER).version))


def gate_tags(uri: str, name: str, version: str) -> dict[str, str]:
    return mlflow.MlflowClient(uri).get_model_version(name, version).tags


def version_file(runs, name: str, version: str, file: str) -> str:
    """The text of one of a version's files (card or record), downloaded through MLflow."""
    with isolated_tracking(runs["root"]):
        return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}/{file}")
                    ).read_text()


def version_record(runs, name: str, version: str) -> dict:
    return json.loads(version_file(runs, name, version, model_card.record_file(version)))


def gate_record(runs, name: str, version: str) -> dict:
    return version_record(runs, name, version)["gate"]


def test_worse_is_kept_out_equal_is_kept_out_force_promotes_better_is_promoted(runs):
    name, uri = "gate-sequence", runs["uri"]
    first = register_run(runs["good"], name)
    assert first.champion and "no champion yet" in first.reason
    assert gate_tags(uri, name, first.version)["gate.decision"] == "first champion"

    worse = register_run(runs["bad"], name)
    assert not worse.champion and "no evidence of improvement" in worse.reason
    assert aliases(uri, name) == (first.version, worse.version)
    tags, record = gate_tags(uri, name, worse.version), gate_record(runs, name, worse.version)
    assert tags["gate.decision"] == record["decision"] == "not promoted"
    judged = record["comparison"]
    assert judged["balanced_accuracy"]["delta"]["ci_high"] < 0  # clearly worse, not unproven
    assert tags["gate.champion_version"] == record["champion"]["version"] == first.version
    assert tags["gate.set_images"] == "99" == str(judged["set"]["images"])
    assert len(judged["set"]["digest"]) == 64
    assert "test split shared by runs" in judged["set"]["description"]

    equal = register_run(runs["good"], name)  # the champion's own model again
    assert not equal.champion
    assert equal.gate.result.delta.value == 0.0 and equal.gate.result.delta.low == 0.0

    forced = register_run(runs["bad"], name, GateOptions(force=True))
    assert forced.champion and "--force replaced champion version" in forced.reason
    assert "the gate alone would keep it" in forced.reason
    assert gate_tags(uri, name, forced.version)["gate.decision"] == "forced"
    assert aliases(uri, name) == (forced.version, forced.version)

    better = register_run(runs["good"], name)
    assert better.champion and f"beats champion version {forced.version}" in better.reason
    assert better.gate.result.delta.low > 0
    assert aliases(uri, name) == (better.version, better.version)
    record = gate_record(runs, name, better.version)
    assert gate_tags(uri, name, better.version)["gate.decision"] == record["decision"]
    assert record["decision"] == "promoted"
    # The gate judged both models on the same 99 images the worse one was refused on.
    refused = gate_record(runs, name, worse.version)["comparison"]
    assert record["comparison"]["set"]["digest"] == refused["set"]["digest"]
    assert record["comparison"]["balanced_accuracy"]["delta"]["value"] == pytest.approx(
        -refused["balanced_accuracy"]["delta"]["value"], abs=1e-9)


def selection_tag(runs, run_id: str) -> str:
    """The selection metric with the 95 % CI its run logged, as the version tag shows it."""
    m = mlflow.MlflowClient(runs["uri"]).get_run(run_id).data.metrics
    return (f"{m['best_val_balanced_accuracy']:.3f} [{m['best_val_balanced_accuracy_ci_low']:.2f}"
            f", {m['best_val_balanced_accuracy_ci_high']:.2f}]")


def test_a_version_carries_at_most_six_tags_and_the_full_record_as_json(runs):
    name = "gate-record"
    first = register_run(runs["good"], name)
    refused = register_run(runs["bad"], name, GateOptions(min_delta=0.01, seed=3))
    assert gate_tags(runs["uri"], name, first.version) == {
        "gate.decision": "first champion", "gate.forced": "False",
        "val_balanced_accuracy": selection_tag(runs, runs["good"])}
    tags = gate_tags(runs["uri"], name, refused.version)
    assert set(tags) == {"gate.decision", "gate.delta", "gate.set_images", "gate.forced",
                         "gate.champion_version", "val_balanced_accuracy"}  # six, no more
    assert tags["val_balanced_accuracy"] == selection_tag(runs, runs["bad"])
    assert gate_record(runs, name, first.version) == {
        "decision": "first champion", "reason": first.reason, "forced": False,
        "min_delta": 0.0, "champion": None, "comparison": None}

    record, result = gate_record(runs, name, refused.version), refused.gate.result
    assert record["decision"] == "not promoted" and record["reason"] == refused.reason
    assert (record["forced"], record["min_delta"]) == (False, 0.01)
    assert record["champion"] == {"version": first.version, "run_id": runs["good"]}
    judged = record["comparison"]
    for key, interval in (("challenger", result.a), ("champion", result.b),
                          ("delta", result.delta)):
        assert judged["balanced_accuracy"][key] == pytest.approx(
            {"value": interval.value, "ci_low": interval.low, "ci_high": interval.high})
    image_set = refused.gate.image_set
    assert judged["set"] == {"description": image_set.description, "digest": image_set.digest,
                             "images": 99, "lesions": image_set.lesions}
    assert (judged["rounds"], judged["seed"]) == (result.rounds, 3)
    delta = result.delta
    assert tags["gate.delta"] == f"{delta.value:+.3f} [{delta.low:+.3f}, {delta.high:+.3f}]"
    assert tags["gate.champion_version"] == first.version and tags["gate.set_images"] == "99"


def test_the_decision_is_in_the_versions_own_model_card(runs):
    name = "gate-card"
    register_run(runs["good"], name)
    refused = register_run(runs["bad"], name)
    cards = {v: version_file(runs, name, v, model_card.card_file(v))
             for v in ("1", refused.version)}
    assert "## Promotion gate" in cards["1"] and "**first champion**" in cards["1"]
    assert "`version_v1.json`" in cards["1"]
    card, record = cards[refused.version], gate_record(runs, name, refused.version)
    assert "**not promoted**" in card and "Δ = this version - champion" in card
    assert f"`version_v{refused.version}.json`" in card
    judged = record["comparison"]
    assert judged["set"]["digest"] in card and judged["set"]["description"] in card
    assert record["champion"]["run_id"] in card
    assert refused.gate.result.delta.signed() in card
    assert str(refused.gate.result.a) in card and str(refused.gate.result.b) in card
    assert "99 images" in card and "paired bootstrap over lesions" in card
    assert f"{judged['rounds']} rounds, seed {judged['seed']}" in card


def test_different_splits_need_gate_data_exit_2_and_nothing_is_registered(runs):
    name = "gate-splits"
    register_run(runs["good"], name)
    result = runs["store"].cli_in_process("register", "--run-id", runs["other_split"],
                                          "--name", name)  # refused before any work
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run {runs['other_split']} and champion version 1")
    assert "--gate-data DIR" in last and "Traceback" not in result.stderr
    client = mlflow.MlflowClient(runs["uri"])
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    sample = str(default_data_dir())
    result = runs["store"].cli_in_process("register", "--run-id", runs["other_split"],
                                          "--name", name, "--gate-data", sample)
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"registered {name} version 2 from run {runs['other_split']}")
    assert "660 images" in line and "Δ balanced accuracy" in line
    # Both models trained on part of the sample: the gate says so rather than hide it.
    assert "the comparison favours that model" in result.stderr
    assert gate_record(runs, name, "2")["comparison"]["set"]["description"] == (
        f"all of {sample}")


def test_register_picks_by_validation_and_refuses_test_metrics(runs):
    client = mlflow.MlflowClient(runs["uri"])
    experiment = client.get_experiment_by_name("skin-lesion").experiment_id
    # An evaluation run with higher scores than any model must never be picked.
    with isolated_tracking(runs["root"]), mlflow.start_run(experiment_id=experiment):
        mlflow.set_tag("skinml.role", "evaluation")
        mlflow.log_metrics({"best_val_balanced_accuracy": 0.99, "test_balanced_accuracy": 0.99})
    # in-process: tests/cli/test_models.py runs `skinml register --experiment` in its own
    result = runs["store"].cli_in_process("register", "--experiment", "skin-lesion",
                                          "--name", "gate-pick")
    assert result.returncode == 0, result.stderr[-2000:]
    trained = {r: client.get_run(r).data.metrics["best_val_balanced_accuracy"]
               for r in (runs["good"], runs["bad"], runs["other_split"])}
    best = max(trained, key=trained.get)
    assert f"from run {best}" in result.stdout

    with isolated_tracking(runs["root"]), pytest.raises(RegistryError) as refused:
        best_run("skin-lesion", "test_balanced_accuracy")
    assert str(refused.value) == (
        "--metric test_balanced_accuracy is a test metric: the test split is reported, "
        "never used to choose; pick by validation, e.g. best_val_balanced_accuracy")
    with isolated_tracking(runs["root"]):
        assert best_run("skin-lesion", "val_loss").data.metrics["val_loss"] == min(
            client.get_run(r).data.metrics["val_loss"] for r in trained)  # lower is better


def test_a_champion_that_moved_during_the_gate_is_judged_again(runs):
    """Two registrations racing: the later one must beat the champion the earlier one set."""
    from skinml.workflows.registry import _judged_against_current

    name, client = "gate-race", mlflow.MlflowClient(runs["uri"])
    bad = client.get_run(runs["bad"])
    # The bad model's registration judged while there was no champion yet ...
    judged, note = _judge(bad, None, name, GateOptions())
    assert judged is None
    # ... and meanwhile a racing registration made the good model champion.
    register_run(runs["good"], name)
    compared, judged, _ = _judged_against_current(client, name, bad, None, judged, note,
                                                  GateOptions())
    assert str(compared.version) == "1" and compared.run_id == runs["good"]
    assert judged.result.delta.high < 0  # judged again, against the new champion: no win


def test_first_registration_becomes_champion_and_challenger(runs):
    name = "first-registration"
    with isolated_tracking(runs["root"]):
        first = register_run(runs["good"], name)
    client = mlflow.MlflowClient(runs["uri"])
    version = client.get_model_version_by_alias(name, CHAMPION)
    assert str(version.version) == first.version
    assert client.get_model_version_by_alias(name, CHALLENGER).version == version.version
    assert version.run_id == runs["good"] and version.description
    assert "no champion yet" in first.reason


def test_a_registration_cut_short_before_its_gate_is_judged_once_when_continued(runs):
    """Killed between registering the version and moving `champion` (the pipeline's
    registration stage): continuing judges that version; no second version, and the first
    champion is named."""
    name, client = "cut-short", mlflow.MlflowClient(runs["uri"])
    def registered_only() -> str:  # what the stopped call had done
        return str(mlflow.register_model(logged_model_uri(runs["good"]), name).version)

    with isolated_tracking(runs["root"]):
        version = registered_only()
        assert not gated(name, version)
        finished = register_run(runs["good"], name, version=version)
        assert gated(name, version)
    assert finished.version == version and finished.champion
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [version]
    assert aliases(runs["uri"], name) == (version, version)
    assert gate_tags(runs["uri"], name, version)["gate.decision"] == "first champion"
    # cut short after `champion` moved to a new version, before its record: the record says
    # the comparison is gone rather than judging the version against itself
    with isolated_tracking(runs["root"]):
        again = registered_only()
        client.set_registered_model_alias(name, CHAMPION, again)
        finished = register_run(runs["good"], name, version=again)
    assert finished.champion and "made champion before a restart" in finished.reason
    assert gate_record(runs, name, again)["decision"] == "promoted"
    assert aliases(runs["uri"], name) == (again, again)


def test_the_versions_json_record_holds_its_provenance_and_the_card_shows_it(runs):
    name = "provenance"
    with isolated_tracking(runs["root"]):
        version = register_run(runs["good"], name).version
    run = mlflow.MlflowClient(runs["uri"]).get_run(runs["good"])
    m, params = run.data.metrics, run.data.params
    provenance = version_record(runs, name, version)["provenance"]

    def logged(key: str) -> dict:
        return {"value": m[key], "ci_low": m[f"{key}_ci_low"], "ci_high": m[f"{key}_ci_high"]}

    digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert set(digests) == {"ham10000-train", "ham10000-val", "ham10000-test"}
    assert provenance == {
        "run_id": runs["good"], "run_name": run.info.run_name,
        "arch": params["model.arch"], "split_seed": params["data.split_seed"],
        "git_commit": run.data.tags.get("mlflow.source.git.commit"), "datasets": digests,
        "val_balanced_accuracy": logged("best_val_balanced_accuracy"),
        "test_reported_only": {"balanced_accuracy": logged("test_balanced_accuracy"),
                               "auc": logged("test_auc")}}
    card = version_file(runs, name, version, model_card.card_file(version))
    assert "## Provenance" in card and f"`provenance` in `version_v{version}.json`" in card
    for shown in (f"| MLflow run | `{runs['good']}` ({run.info.run_name}) |",
                  f"| architecture | {params['model.arch']} |",
                  f"| split seed | {params['data.split_seed']} |",
                  *(f"| data digest, {n} | `{d}` |" for n, d in digests.items()),
                  "| test balanced accuracy (reported only) | "
                  f"{m['test_balanced_accuracy']:.3f} (95 % CI "
                  f"{m['test_balanced_accuracy_ci_low']:.3f}-"
                  f"{m['test_balanced_accuracy_ci_high']:.3f}) |"):
        assert shown in card, shown
