"""Ablation specs are checked before any work (params/ablations/*.yaml)."""
import pytest

from lib import ablation, domain_adapt, pipeline


def test_the_domain_ablation_compares_every_pretraining_method_the_code_has():
    spec = ablation.load_spec("domain")
    assert sorted(arm["domain_method"] for arm in spec["arms"].values()) == sorted(domain_adapt.METHODS)
    assert spec["stages"][0] == "03_domain_adapt" and spec["stages"][-1] == "06_evaluate"


@pytest.mark.parametrize("name", ["domain", "finetune"])
def test_every_arm_sets_only_parameters_its_stages_declare(name):
    """A misspelt override would otherwise be a silent no-op in every arm."""
    spec = ablation.load_spec(name)
    declared = {p for stage in spec["stages"] for p in pipeline.declared_parameters(stage)}
    for arm, overrides in {"overrides": spec["overrides"], **spec["arms"]}.items():
        assert set(overrides) <= declared, (arm, set(overrides) - declared)


def test_an_unknown_ablation_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"must be one of \['domain', 'finetune'\]"):
        ablation.load_spec("domian")


@pytest.mark.parametrize("text, message", [
    ("stages: [04_finetune, 03_domain_adapt]\narms: {a: {}, b: {}}", "pipeline order"),
    ("stages: [03_domain_adapt, 09_magic]\narms: {a: {}, b: {}}", "pipeline order"),
    ("stages: [03_domain_adapt]\narms: {a: {domain_method: mlm}}", "at least two arm names"),
    ("stages: [03_domain_adapt]\narms: {a: {}, b: {}}\nseeds: [1, 2]", "expected the keys"),
])
def test_a_malformed_spec_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        ablation.load_spec(str(path))
    assert str(path) in str(error.value)


def test_arms_read_the_runs_finished_upstream_stages(tmp_path):
    runs = tmp_path / "runs"
    for stage in ("00_corpus", "01_teacher"):
        (runs / "r" / stage).mkdir(parents=True)
        (runs / "r" / stage / "metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="02_pairs is not finished"):
        ablation.link_upstream("r", "03_domain_adapt", runs, tmp_path / "arm")
    ablation.link_upstream("r", "02_pairs", runs, tmp_path / "arm")
    assert (tmp_path / "arm" / "r" / "01_teacher").resolve() == (runs / "r" / "01_teacher").resolve()


def test_choosing_arms_keeps_their_order_and_refuses_an_unknown_one(tmp_path):
    from lib.config import ConfigError
    from lib.pipeline import run_ablation

    with pytest.raises(ConfigError, match=r"no arm teacher_margin; its arms are previous, default, distill"):
        run_ablation("finetune", "dnd", "default", str(tmp_path), str(tmp_path), arms=["default", "teacher_margin"])
    assert not any(tmp_path.iterdir())  # refused before any work
