"""Site personalization and task heads, through the API and the `fedmeta` CLI."""

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_base
from fedmeta.cli import app
from fedmeta.data import Schema, load_site
from fedmeta.personalize import PersonalizationError, head_task, load_base, personalize, train_head
from fedmeta.registry import SiteHome

runner = CliRunner()


def _personalize_cli(home, hospitals, base, *extra, site_file="hospital_002.csv"):
    args = ["personalize", "--data", str(hospitals / site_file), "--schema", str(hospitals / "schema.json"), "--base", str(base), "--site-home", str(home)]
    return runner.invoke(app, args + list(extra))


@pytest.fixture()
def site(hospitals, base_run):
    """hospital_002's rows, normalized as the base model was trained (the generated schema leaves it to the federation)."""
    return load_site(hospitals / "hospital_002.csv", load_base(base_run).schema_for(Schema.load(hospitals / "schema.json")))


@pytest.mark.slow
def test_personalize_registers_promotes_and_reports_base_vs_personalized(tmp_path, hospitals, base_run):
    result = _personalize_cli(tmp_path, hospitals, base_run, "--shots", "5", "--mode", "all")
    assert result.exit_code == 0, result.output
    assert "personalized" in result.output and "registered v2" in result.output
    home = SiteHome(tmp_path)
    base, mine = home.registry.versions()
    assert (base.kind, base.site) == ("base", None)
    assert (mine.kind, mine.site, mine.parent) == ("personalized", "hospital_002", base.version)
    assert home.registry.current("hospital_002") == mine
    manifest, _ = home.load(mine)
    assert manifest.base_version == base.version and manifest.base_sha256 == base.sha256
    assert manifest.run_id.startswith("base-") and manifest.shots == 5
    assert manifest.data["sha256"] and manifest.libraries["torch"].startswith("2.13")
    assert {t.name for t in manifest.tasks if t.personalized} == {"readmission_30d", "mortality", "length_of_stay"}
    assert "mortality.personalized.auc" in manifest.metrics and "mortality.base.auc" in manifest.metrics


@pytest.mark.slow  # whole `fedmeta personalize` runs through the CLI, several per test
def test_personalization_is_deterministic_for_a_seed(tmp_path, hospitals, base_run):
    assert _personalize_cli(tmp_path, hospitals, base_run, "--seed", "3").exit_code == 0
    again = _personalize_cli(tmp_path, hospitals, base_run, "--seed", "3")
    assert "identical to an existing version: v2" in again.output
    other = _personalize_cli(tmp_path, hospitals, base_run, "--seed", "4")
    assert "registered v3" in other.output


@pytest.mark.slow
def test_base_can_come_from_the_registry(tmp_path, hospitals, base_run):
    assert _personalize_cli(tmp_path, hospitals, base_run).exit_code == 0
    result = _personalize_cli(tmp_path, hospitals, "v1", "--mode", "head", "--shots", "10")
    assert result.exit_code == 0, result.output
    assert SiteHome(tmp_path).registry.get(3).parent == 1


def test_head_mode_moves_only_the_heads(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    result = personalize(base, site, shots=5, steps=5, lr=0.05, mode="head")
    for name, value in result.model.params.items():
        moved = not torch.equal(value, base.params[name])
        assert moved == name.startswith("heads."), name


def test_metasgd_mode_uses_the_learned_rates(tmp_path, hospitals, site):
    fomaml = load_base(write_base(tmp_path / "fomaml")).for_schema(site.schema)
    with pytest.raises(PersonalizationError, match="needs a base model meta-trained with algorithm metasgd"):
        personalize(fomaml, site, mode="metasgd")
    metasgd = load_base(write_base(tmp_path / "metasgd", algorithm="metasgd")).for_schema(site.schema)
    frozen = {k: torch.zeros_like(v) for k, v in metasgd.state["inner_lrs"].items()}
    metasgd.state["inner_lrs"] = {k: (v if k.startswith("heads.mortality.") else frozen[k]) for k, v in metasgd.state["inner_lrs"].items()}
    result = personalize(metasgd, site, mode="metasgd")
    for name, value in result.model.params.items():
        assert (not torch.equal(value, metasgd.params[name])) == name.startswith("heads.mortality."), name


def test_more_shots_than_rows_is_a_clear_error(tmp_path, hospitals, base_run):
    result = _personalize_cli(tmp_path, hospitals, base_run, "--shots", "400", "--mode", "all")
    assert result.exit_code == 2
    assert "site 'hospital_002', task 'readmission_30d': K=400 shots per class x 2 classes need 800 labelled training rows, the site has" in " ".join(result.output.split())
    assert not (tmp_path / "models").exists()


def test_a_diverging_fine_tune_is_refused(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    with pytest.raises(PersonalizationError, match="fine-tuning diverged"):
        personalize(base, site, steps=30, lr=50.0)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda df: df.drop(columns=["creatinine"]), "missing feature column(s) ['creatinine']"),
        (lambda df: df.assign(age=df["age"].where(df.index != 4)), "column 'age' row 6: missing value (NaN)"),
        (lambda df: df.assign(ward=df["ward"].where(df.index != 2, "oncology")), "column 'ward' row 4: unknown category (value not shown)"),
        (lambda df: df.assign(heart_rate=df["heart_rate"].astype(object).where(df.index != 0, "fast")), "column 'heart_rate' row 2: expected a number, got (value not shown)"),
    ],
    ids=["missing-column", "nan", "unknown-category", "wrong-type"],
)
def test_bad_site_data_names_file_column_and_row_and_writes_nothing(tmp_path, hospitals, base_run, corrupt, message):
    bad = tmp_path / "bad.csv"
    corrupt(pd.read_csv(hospitals / "hospital_002.csv")).to_csv(bad, index=False)
    home = tmp_path / "home"
    args = ["personalize", "--data", str(bad), "--schema", str(hospitals / "schema.json"), "--base", str(base_run), "--site-home", str(home)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert str(bad) in output.replace(" ", "") or "bad.csv" in output
    assert message in output
    assert not (home / "models").exists()


def _sepsis_rows(hospitals, n):
    df = pd.read_csv(hospitals / "hospital_002.csv").head(n)
    df["sepsis"] = (df["wbc"] > df["wbc"].median()).map({True: "yes", False: "no"})
    return df.drop(columns=["readmitted_30d", "died_in_hospital", "length_of_stay_days"])


@pytest.mark.slow
def test_new_head_on_the_frozen_body_is_scored_on_held_out_rows_and_registered(tmp_path, hospitals, base_run):
    assert _personalize_cli(tmp_path, hospitals, base_run).exit_code == 0
    rows = tmp_path / "sepsis.csv"
    _sepsis_rows(hospitals, 200).to_csv(rows, index=False)
    result = runner.invoke(app, ["heads", "add", "--task", "sepsis", "--kind", "binary", "--data", str(rows), "--site-home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "scored on 50 held-out rows of 200" in " ".join(result.output.split())
    home = SiteHome(tmp_path)
    head = home.registry.get(3)
    assert (head.kind, head.parent, head.site) == ("head", 2, "hospital_002")
    manifest, _ = home.load(head)
    sepsis = next(t for t in manifest.tasks if t.name == "sepsis")
    assert sepsis.classes == ["no", "yes"] and sepsis.personalized
    # The control: the same rows with the labels shuffled give a head that ranks by nothing.
    shuffled = _sepsis_rows(hospitals, 200)
    shuffled["sepsis"] = shuffled["sepsis"].sample(frac=1.0, random_state=0).to_numpy()
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False)
    control = runner.invoke(app, ["heads", "add", "--task", "sepsis", "--kind", "binary", "--data", str(tmp_path / "shuffled.csv"),
                                  "--site-home", str(tmp_path), "--from", "v2"])
    assert control.exit_code == 0, control.output
    control_auc = home.load(home.registry.get(4))[0].metrics["sepsis.head.auc"]
    print(f"sepsis head AUC {manifest.metrics['sepsis.head.auc']:.3f}, shuffled-label control {control_auc:.3f}")
    assert manifest.metrics["sepsis.head.auc"] > control_auc + 0.15  # wbc is a model input: the body's features rank by it
    from fedmeta.personalize import load_trained

    before, after = load_trained(home, home.registry.get(2)), load_trained(home, head)
    assert all(torch.equal(before.params[k], after.params[k]) for k in before.params)  # ANIL: body and other heads unchanged


def test_too_few_rows_for_a_held_out_score_says_so(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    df = _sepsis_rows(hospitals, 12)
    task = head_task(base.schema, "sepsis", "binary", None, None, df, "few.csv")
    result = train_head(base, task, df, "few.csv", steps=50, site=site.name)
    assert result.metrics == {} and "only 12 labelled rows: no held-out score" in result.note
    assert "sepsis" in result.model.tasks


def test_head_for_a_federation_task_starts_from_its_head_and_reports_the_previous_score(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    df = pd.read_csv(hospitals / "hospital_002.csv").head(120)
    task = head_task(base.schema, "mortality", None, None, None, df, "m.csv")
    result = train_head(base, task, df, "m.csv", steps=100, tune_body=True, site=site.name)
    assert {"mortality.head.acc", "mortality.previous.acc"} <= set(result.metrics)
    assert any(not torch.equal(result.model.params[k], base.params[k]) for k in base.params if k.startswith("body."))


def test_new_task_needs_a_kind_and_both_classes(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    df = _sepsis_rows(hospitals, 40)
    with pytest.raises(PersonalizationError, match="new to the federation: give its kind"):
        head_task(base.schema, "sepsis", None, None, None, df, "s.csv")
    one_class = df.assign(sepsis="yes")
    task = head_task(base.schema, "sepsis", "binary", None, ["no", "yes"], one_class, "s.csv")
    with pytest.raises(PersonalizationError, match="at least two classes"):
        train_head(base, task, one_class, "s.csv", site=site.name)


@pytest.mark.slow  # whole `fedmeta personalize` runs through the CLI, several per test
def test_models_cli_lists_promotes_rolls_back_and_refuses_tampered_files(tmp_path, hospitals, base_run):
    assert _personalize_cli(tmp_path, hospitals, base_run, "--seed", "1").exit_code == 0
    assert _personalize_cli(tmp_path, hospitals, base_run, "--seed", "2").exit_code == 0
    home = ["--site-home", str(tmp_path)]
    listing = runner.invoke(app, ["models", "list", *home])
    assert listing.exit_code == 0 and "v3" in listing.output
    assert runner.invoke(app, ["models", "promote", "v3", *home]).exit_code == 0
    assert SiteHome(tmp_path).registry.current("hospital_002").version == 3
    rollback = runner.invoke(app, ["models", "rollback", *home])
    assert rollback.exit_code == 0 and "from v3 to v2" in rollback.output
    shown = runner.invoke(app, ["models", "show", "v2", *home])
    assert shown.exit_code == 0 and '"hashes": "verified"' in shown.output
    onnx_file = SiteHome(tmp_path).folder(SiteHome(tmp_path).registry.get(3)) / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    refused = runner.invoke(app, ["models", "promote", "v3", *home])
    assert refused.exit_code == 1 and "does not match the hash the registry recorded" in " ".join(refused.output.split())
    audit = runner.invoke(app, ["models", "audit", *home])
    assert audit.exit_code == 0 and "rollback" in audit.output


def test_auto_steps_choose_by_rows_outside_the_support_never_the_held_out_ones(hospitals, base_run, site):
    base = load_base(base_run).for_schema(site.schema)
    result = personalize(base, site, shots=5, steps="auto", lr=0.05, seed=0)
    assert result.steps in (5, 10, 20, 40)
    selection = result.steps_selection
    assert set(selection["candidates"]) == {"5", "10", "20", "40"}
    assert int(min(selection["candidates"], key=selection["candidates"].get)) == result.steps
    support_rows = sum(5 * (site.schema.task(t).n_classes or 1) for t in result.tasks)
    training_rows = sum(site.n_labelled(t, train=True) for t in result.tasks)
    assert selection["rows"] <= training_rows - support_rows + 3  # padding aside, only non-support training rows
    with pytest.raises(PersonalizationError, match="steps must be a number >= 0 or 'auto'"):
        personalize(base, site, steps="many")


def test_two_sites_keeping_the_same_weights_each_get_their_own_promoted_version(tmp_path, base_run):
    # A site whose best choice is the base as it is publishes the base's weights; so may another. The registry keeps
    # one version per model file, and the file names its site, so neither site is refused the other's version.
    import onnx

    from fedmeta.personalize import publish, register_base

    from fedmeta.data import hospital_schema

    home = SiteHome(tmp_path / "home")
    base_version = register_base(home, load_base(base_run))
    base = load_base(base_run).for_schema(hospital_schema())
    versions = [publish(home, base, "personalized", site, base_version, base_version, {}, {}, {}, promote=True).version for site in ("a", "b")]
    assert versions[0].version != versions[1].version
    assert [home.registry.current(s).version for s in ("a", "b")] == [v.version for v in versions]
    for site, version in zip(("a", "b"), versions):
        props = {p.key: p.value for p in onnx.load_from_string(home.load(version)[1]).metadata_props}
        assert props["fedmeta.site"] == site
    again = publish(home, base, "personalized", "a", base_version, base_version, {}, {}, {}, promote=True)
    assert again.version.version == versions[0].version and not again.created, "the same site's same model is still one version"
