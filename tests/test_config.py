"""Every config composes; schemas are typed; the technique list is the pipeline order."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from slimlab.config import CONFIG_DIR, EXPERIMENTS_DIR, compose

GROUPS = ["model", "data", "technique", "device", "tracking"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in GROUPS for option in options(group)] or [("model", "lenet")]
)
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"] if group != "technique" else [f"technique=[{option}]"])
    OmegaConf.resolve(cfg)
    assert cfg[group] is not None


@pytest.mark.parametrize("name", sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    OmegaConf.resolve(cfg)
    assert cfg.experiment_name == ("bench" if name.startswith("bench_") else name)  # benchmarks share one


def test_experiments_reachable_as_the_experiment_group():
    assert (CONFIG_DIR / "experiment").resolve() == EXPERIMENTS_DIR.resolve()


def test_technique_list_order_is_pipeline_order():
    assert list(compose(["technique=[prune,quantize]"]).technique) == ["prune", "quantize"]
    assert list(compose(["technique=[quantize,prune]"]).technique) == ["quantize", "prune"]
    assert list(compose(["technique=[]"]).technique) == []


def test_technique_options_are_typed_by_their_schema():
    from slimlab.plugins.prune import PruneConfig

    cfg = compose(["technique.prune.amount=0.75"])
    assert OmegaConf.get_type(cfg.technique.prune) is PruneConfig
    assert cfg.technique.prune.amount == 0.75
    with pytest.raises(Exception, match="amount"):
        compose(["technique.prune.amount=lots"])
    with pytest.raises(Exception, match="amout"):
        compose(["technique.prune.amout=0.5"])


def test_root_keys_are_typed():
    with pytest.raises(Exception, match="epochs"):
        compose(["train.epochs=many"])


def test_models_and_data_are_built_from_target():
    from slimlab.baseline import build_model

    cfg = compose(["model=lenet"])
    model = build_model(cfg.model)  # name, checkpoint and pretrained are slimlab's keys, not LeNet's arguments
    assert sum(p.numel() for p in model.parameters()) == 431_080  # the founding document's LeNet
