"""The smoke study learns, and CI's gate notices when it stops (issue #19, item 5).

Real fine-tunes (Ray Train local mode) of the four smoke backbones on the generated synthetic task,
with the shipped params.yaml's data and protocol: each family's best backbone must clear the
learning floor. Then a bug that stops learning is planted (a learning rate of ~0) and the gate
(``transferbench compare --baseline``) must fail naming the task, the family and the floor, even
against a baseline taken from the broken study itself, where no rank moved.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from study_files import assert_ranks_file
from transferbench.cli import main
from transferbench.config import load_settings
from transferbench.data.splits import split_task
from transferbench.data.synthetic import generate
from transferbench.stages.finetune import run_finetune

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BACKBONES = ("test_resnet", "test_convnext", "test_vit", "test_vit2")


def _params(root: Path, **finetune: float) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["study"].update(name="floor-study", tasks=["synthetic"], backbones=list(BACKBONES), seeds=[0],
                        retrieval_tasks=[], multitask_tasks=[])
    raw["tasks"]["synthetic"]["modes"] = ["full"]
    raw["finetune"].update(finetune)
    raw["ray"]["storage_path"] = str(root / "ray_results")
    raw["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_location=str(root / "art"),
                           system_metrics=False, log_model=False)
    raw["compare"].update(metrics_dir=str(root / "metrics"), ranks_file=str(root / "ranks.json"),
                          baseline=str(root / "baseline.json"),
                          learning_floors={"synthetic": raw["compare"]["learning_floors"]["synthetic"]})
    raw["data"].update(reports_dir=str(root / "reports"))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _study(root: Path, **finetune: float) -> Path:
    root.mkdir()
    params = _params(root, **finetune)
    settings = load_settings(params)
    assert settings.compare.learning_floors == {"synthetic": 0.9} and settings.ray.local_mode
    for backbone in BACKBONES:
        run_finetune(settings, task="synthetic", backbone=backbone, seed=0, metrics_dir=root / "metrics",
                     plots_dir=root / "plots")
    return params


@pytest.fixture(scope="module")
def synthetic_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped synthetic task, generated and split once for the module (relative data paths)."""
    root = tmp_path_factory.mktemp("floor")
    settings = load_settings(REPO / "params.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        generate(settings.data.synthetic, Path(settings.data.generated_dir) / "synthetic")
        split_task("synthetic", settings.task("synthetic"), settings.data)
    return root


def test_the_smoke_backbones_learn_and_a_study_that_stopped_learning_fails_the_gate(synthetic_splits, monkeypatch,
                                                                                      capsys):
    monkeypatch.chdir(synthetic_splits)
    learning = _study(synthetic_splits / "learning")
    assert main(["--params", str(learning), "compare"]) == 0
    assert set(assert_ranks_file(learning)["average_rank"]["backbones"]) == set(BACKBONES)
    shutil.copy(synthetic_splits / "learning" / "reports" / "rank_table.json", synthetic_splits / "learning" /
                "baseline.json")
    assert main(["--params", str(learning), "compare", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "every learning floor is met" in out
    for family in ("convnet", "transformer"):
        (line,) = [x for x in out.splitlines() if x.startswith(f"| yes | synthetic | {family} |")]
        assert float(line.split("|")[5].split()[0]) >= 0.9, line

    # The planted bug: the optimiser never moves the weights.
    broken = _study(synthetic_splits / "broken", lr=1e-12, warmup_lr=1e-12)
    assert main(["--params", str(broken), "compare"]) == 0
    shutil.copy(synthetic_splits / "broken" / "reports" / "rank_table.json", synthetic_splits / "broken" /
                "baseline.json")  # even a baseline regenerated from the broken study does not hide it
    capsys.readouterr()
    assert main(["--params", str(broken), "compare", "--baseline"]) == 1
    out = capsys.readouterr().out
    assert "Nothing moved." in out and "**DRIFT: 2 change(s) fail the gate**" in out
    for family in ("convnet", "transformer"):
        (line,) = [x for x in out.splitlines() if f"| synthetic | {family} |" in x]
        assert "fails the gate" in line and ">= 0.9" in line and f"LEARNING FLOOR: the best {family}" in line
