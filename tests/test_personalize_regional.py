"""The default personalization with a regional base: weighed beside the global base on the same folds, kept only where it helps."""

import pytest
import torch

from fedmeta.data import hospital_federation
from fedmeta.personalize import PersonalizationError, choose_personalization
from fedmeta.personalize.choice import REGIONAL_ALLOWANCE, pick
from fedmeta.trained import TrainedModel


@pytest.fixture(scope="module")
def site():
    return hospital_federation(n_sites=2, seed=0)[1]


@pytest.fixture(scope="module")
def untrained(site):
    return TrainedModel.initial(site.schema, hidden=(16, 16), seed=0)


@pytest.fixture(scope="module")
def fitted(site, untrained):
    """A base that already fits this site's rows: the chosen personalization of the untrained one."""
    return choose_personalization(untrained, site, seed=0).model


def scrambled(model: TrainedModel) -> TrainedModel:
    """The same network with large random weights: a base that teaches nothing."""
    g = torch.Generator().manual_seed(1)
    params = {k: torch.randn(v.shape, generator=g) * 5 for k, v in model.params.items()}
    return TrainedModel(model.schema, model.hidden, {"params": params})


def test_every_candidate_is_also_fitted_from_the_regional_base(site, untrained):
    result = choose_personalization(untrained, site, seed=0, regional=untrained)
    labels = sorted(result.steps_selection["validation"])
    assert labels == ["blend(α=0.5)", "ditto(λ=10)", "regional:blend(α=0.5)", "regional:ditto(λ=10)"]
    assert result.steps_selection["levels"] == ["global", "regional"]


def test_a_regional_base_that_fits_the_site_is_chosen(site, untrained, fitted):
    result = choose_personalization(untrained, site, seed=0, regional=fitted)
    assert result.steps_selection["chosen"].startswith("regional:")
    assert result.mode.startswith("chosen:regional:")
    scores = result.steps_selection["validation"]
    assert scores[result.steps_selection["chosen"]]["loss"] < min(v["loss"] for k, v in scores.items() if not k.startswith("regional:"))


def test_a_regional_base_that_teaches_nothing_is_not_chosen(site, fitted):
    result = choose_personalization(fitted, site, seed=0, regional=scrambled(fitted))
    assert not result.steps_selection["chosen"].startswith("regional:")


def test_a_regional_base_with_other_tasks_is_refused(site, untrained):
    other = hospital_federation(n_sites=2, seed=0)[0].schema
    narrow = TrainedModel.initial(other.model_copy(update={"tasks": other.tasks[:1]}), hidden=(16, 16))
    with pytest.raises(PersonalizationError, match="regional base's tasks"):
        choose_personalization(untrained, site, seed=0, regional=narrow)


def test_a_regional_base_that_only_fits_the_rows_it_learned_is_not_chosen_when_validated_without_them(site, untrained, fitted):
    # The regional base has learned this site's rows (as a seen site's has); its base without the site teaches nothing.
    result = choose_personalization(untrained, site, seed=0, regional=fitted, regional_validation=scrambled(untrained))
    assert not result.steps_selection["chosen"].startswith("regional:")
    assert result.steps_selection["regional_validation"] == "a base of the region trained without this site"


def test_the_chosen_regional_candidate_is_refit_from_the_regional_base_not_its_validation_base(site, untrained, fitted):
    from_fitted = choose_personalization(untrained, site, seed=0, regional=fitted)
    validated_on_fitted = choose_personalization(untrained, site, seed=0, regional=scrambled(fitted), regional_validation=fitted)
    assert validated_on_fitted.steps_selection["chosen"] == from_fitted.steps_selection["chosen"]
    assert validated_on_fitted.steps_selection["chosen"].startswith("regional:")
    assert validated_on_fitted.metrics != from_fitted.metrics  # refit from the scrambled regional base, which scores otherwise


def test_a_validation_base_without_a_regional_base_is_refused(site, untrained):
    with pytest.raises(PersonalizationError, match="without the regional base"):
        choose_personalization(untrained, site, seed=0, regional_validation=untrained)


def test_a_regional_candidate_validated_without_the_site_is_taken_if_it_loses_by_less_than_the_allowance():
    means = {"ditto(λ=10)": {"loss": 0.400, "acc": 0.8}, "regional:ditto(λ=10)": {"loss": 0.400 + REGIONAL_ALLOWANCE - 0.001, "acc": 0.8}}
    assert pick(means, regional_allowance=REGIONAL_ALLOWANCE) == "regional:ditto(λ=10)"
    assert pick(means) == "ditto(λ=10)"  # without a validation base, no allowance


def test_a_regional_candidate_that_loses_by_more_than_the_allowance_is_not_taken():
    means = {"ditto(λ=10)": {"loss": 0.400, "acc": 0.8}, "regional:ditto(λ=10)": {"loss": 0.400 + REGIONAL_ALLOWANCE + 0.001, "acc": 0.8}}
    assert pick(means, regional_allowance=REGIONAL_ALLOWANCE) == "ditto(λ=10)"


def test_a_site_that_never_trained_in_its_region_gives_the_regional_level_the_allowance(site, fitted):
    # A regional base equal to the global one: its candidates tie the global ones on every fold, so only the allowance
    # can make the choice take one, and it must for a site the regional base never saw (a new site of a known region).
    twin = TrainedModel(fitted.schema, fitted.hidden, {"params": {k: v.clone() for k, v in fitted.params.items()}})
    new = choose_personalization(fitted, site, seed=0, regional=twin, regional_saw_site=False)
    assert new.steps_selection["chosen"].startswith("regional:") and new.steps_selection["regional_allowance"] == REGIONAL_ALLOWANCE
    assert new.steps_selection["regional_validation"] == "the regional base, which never saw this site"
    seen = choose_personalization(fitted, site, seed=0, regional=twin)  # the control: a site the regional base trained on
    assert not seen.steps_selection["chosen"].startswith("regional:") and seen.steps_selection["regional_allowance"] == 0.0
