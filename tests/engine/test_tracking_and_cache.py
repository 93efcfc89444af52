"""MLflow tracker under an already-active run (the torchtune pitfall) and the decode-once image cache."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch

from transferbench.errors import DataError
from transferbench.engine.data import CachedImages, build_cache, eval_loader, read_manifests, train_loader
from transferbench.engine.tasks import kind_for_task
from transferbench.engine.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    STUDY_DESCRIPTION,
    MlflowTracker,
    RunRegistry,
)


def _kind(manifests):
    from transferbench.config import TaskSettings

    return kind_for_task(TaskSettings(dataset="synthetic", split={"rule": "random"}), manifests.summary)


def test_tracker_nests_under_an_active_run_and_leaves_it_active(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = RunRegistry(tracking_uri=uri, experiment="transferbench", artifact_location=tmp_path / "art")
    child_id, reused = registry.child_run(study="s", run_key="k", run_name="c", tags={"task": "t"})
    assert not reused and registry.child_run(study="s", run_key="k", run_name="c", tags={}, reuse=child_id) == \
        (child_id, True)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=registry.experiment_id, run_name="optuna-trial") as outer:
        tracker = MlflowTracker(tracking_uri=uri, run_id=child_id, system_metrics=False)
        tracker.log_metrics({"val_loss": 0.5}, step=1)
        tracker.log_params({"lr": 1e-4})
        tracker.close()
        assert mlflow.active_run().info.run_id == outer.info.run_id, "closing the child ended the caller's run"
        mlflow.log_metric("outer_metric", 1.0)
    client = mlflow.MlflowClient(uri)
    child = client.get_run(child_id)
    assert child.data.metrics["val_loss"] == 0.5 and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == registry.study_run("s")
    assert client.get_run(outer.info.run_id).data.metrics == {"outer_metric": 1.0}


def test_the_experiment_is_a_finetuning_experiment_new_or_old(tmp_path):
    """mlflow.experimentKind makes the MLflow UI open the training runs, not the GenAI traces overview."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = RunRegistry(tracking_uri=uri, experiment="fresh", artifact_location=tmp_path / "art")
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(registry.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "finetuning"
    old = client.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())  # a store made before the tag
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert RunRegistry(tracking_uri=uri, experiment="old", artifact_location=tmp_path / "art").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "finetuning"
    client.set_experiment_tag(old, EXPERIMENT_KIND_TAG, "custom_model_development")  # a kind someone chose stays
    RunRegistry(tracking_uri=uri, experiment="old", artifact_location=tmp_path / "art")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_runs_carry_readable_descriptions(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = RunRegistry(tracking_uri=uri, experiment="transferbench", artifact_location=tmp_path / "art")
    client = mlflow.MlflowClient(uri)
    tags = {"task": "covid_geo", "backbone": "test_resnet", "family": "resnet", "weights": "random",
            "weights_label": "random-init", "random_init": "true", "seed": 0, "mode": "full"}
    child, _ = registry.child_run(study="s", run_key="k", run_name="covid_geo/test_resnet/full/seed0", tags=tags)
    parent = registry.study_run("s")
    assert client.get_run(parent).data.tags[NOTE_TAG] == STUDY_DESCRIPTION
    note = client.get_run(child).data.tags[NOTE_TAG]
    for part in ("covid_geo", "test_resnet", "resnet", "random-init", "mode full", "seed 0"):
        assert part in note, (part, note)
    pretrained = {**tags, "weights": "hub:resnet18", "weights_label": "hub-pretrained", "random_init": "false"}
    other, _ = registry.child_run(study="s", run_key="k2", run_name="n", tags=pretrained)
    assert "weights hub-pretrained" in client.get_run(other).data.tags[NOTE_TAG]

    registry.describe(parent, "| backbone | rank |\n|---|---|\n| test_resnet | 1 |")
    assert client.get_run(parent).data.tags[NOTE_TAG].startswith("| backbone | rank |")
    assert registry.study_run("s") == parent and "| test_resnet | 1 |" in client.get_run(parent).data.tags[NOTE_TAG]
    registry.describe(parent, "x" * 9000)  # MLflow keeps 8000 characters of a tag
    long = client.get_run(parent).data.tags[NOTE_TAG]
    assert len(long) == 8000 and long.endswith("truncated: MLflow keeps 8000 characters)*")

    trial = registry.keyed_run(study="s", kind="sensitivity-trial", run_key="t0", run_name="trial0", parent=parent,
                               tags={"task": "covid_geo", "backbone": "test_resnet", "optuna.trial": 0,
                                     "label": "fixed"})
    assert client.get_run(trial).data.tags[NOTE_TAG] == (
        "Sensitivity trial: task **covid_geo**, backbone **test_resnet**, Optuna trial 0 (fixed).")


def test_a_parent_run_made_before_descriptions_gets_the_default_one(tmp_path):
    from transferbench.engine.tracking import KIND_TAG, STUDY_TAG

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = RunRegistry(tracking_uri=uri, experiment="transferbench", artifact_location=tmp_path / "art")
    old = registry.client.create_run(registry.experiment_id, run_name="s", tags={STUDY_TAG: "s", KIND_TAG: "study"})
    assert registry.study_run("s") == old.info.run_id
    assert registry.client.get_run(old.info.run_id).data.tags[NOTE_TAG] == STUDY_DESCRIPTION


def test_images_are_decoded_once_into_a_cache_keyed_by_the_manifest(toy_splits):
    manifests = read_manifests(toy_splits / "splits", "toy")
    cache_dir = toy_splits / "cache_test"
    kind = _kind(manifests)
    first = build_cache(manifests, "val", kind=kind, side=36, cache_dir=cache_dir)
    stamp = os.stat(first).st_mtime_ns
    assert build_cache(manifests, "val", kind=kind, side=36, cache_dir=cache_dir) == first
    assert os.stat(first).st_mtime_ns == stamp
    assert build_cache(manifests, "val", kind=kind, side=40, cache_dir=cache_dir) != first
    data = CachedImages(first, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=False)
    image, label, index = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32  # grayscale PNG -> 3 channels
    assert kind.classes[int(label)] == manifests.frame("val")["label"][0] and index == 0


def test_unknown_label_names_the_row(toy_splits, tmp_path):
    import shutil

    root = tmp_path / "splits"
    shutil.copytree(toy_splits / "splits", root)
    frame = read_manifests(root, "toy").frame("test")
    frame.loc[3, "label"] = "purple"
    frame.to_csv(root / "toy" / "test.csv", index=False)
    with pytest.raises(DataError, match=r"test.csv row 5: label 'purple'"):
        manifests = read_manifests(root, "toy")
        build_cache(manifests, "test", kind=_kind(manifests), side=36, cache_dir=tmp_path / "cache")


def test_loader_processes_keep_the_sample_order_and_repeat_their_augmentations(toy_splits):
    """ray.loader_workers > 0: the seeded sampler still orders the epoch (it runs in the training
    process), and the augmentations drawn in the loader processes repeat with the same torch seed."""
    manifests = read_manifests(toy_splits / "splits", "toy")
    cache = build_cache(manifests, "train", kind=_kind(manifests), side=36, cache_dir=toy_splits / "cache")
    data = CachedImages(cache, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, rotation_degrees=10.0,
                        hflip=True)

    def epochs(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(7)
        loader = train_loader(data, batch_size=8, seed=0, workers=workers)
        out = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            images, _, index = (torch.cat(parts) for parts in zip(*loader, strict=True))
            out.append((index, images))
        return out

    in_process, first, second = epochs(0), epochs(2), epochs(2)
    for (order, _), (order_w, images_w), (order_again, images_again) in zip(in_process, first, second, strict=True):
        assert torch.equal(order_w, order) and torch.equal(order_again, order)
        assert torch.equal(images_w, images_again)
    assert not torch.equal(first[0][1], first[1][1])  # fresh augmentations every epoch
    evaluated = torch.cat([batch[0] for batch in eval_loader(data, batch_size=8, workers=2)])
    assert evaluated.shape == (len(data), 3, 32, 32)
