"""The default personalization with a regional base: weighed beside the global base on the same folds, kept only where it helps."""

import pytest
import torch

from fedmeta.data import hospital_federation
from fedmeta.personalize import PersonalizationError, choose_personalization
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


@pytest.mark.slow
def test_every_candidate_is_also_fitted_from_the_regional_base(site, untrained):
    result = choose_personalization(untrained, site, seed=0, regional=untrained)
    labels = sorted(result.steps_selection["validation"])
    assert labels == ["blend(α=0.5)", "ditto(λ=10)", "regional:blend(α=0.5)", "regional:ditto(λ=10)"]
    assert result.steps_selection["levels"] == ["global", "regional"]


@pytest.mark.slow
def test_a_regional_base_that_fits_the_site_is_chosen(site, untrained, fitted):
    result = choose_personalization(untrained, site, seed=0, regional=fitted)
    assert result.steps_selection["chosen"].startswith("regional:")
    assert result.mode.startswith("chosen:regional:")
    scores = result.steps_selection["validation"]
    assert scores[result.steps_selection["chosen"]]["loss"] < min(v["loss"] for k, v in scores.items() if not k.startswith("regional:"))


@pytest.mark.slow
def test_a_regional_base_that_teaches_nothing_is_not_chosen(site, fitted):
    result = choose_personalization(fitted, site, seed=0, regional=scrambled(fitted))
    assert not result.steps_selection["chosen"].startswith("regional:")


def test_a_regional_base_with_other_tasks_is_refused(site, untrained):
    other = hospital_federation(n_sites=2, seed=0)[0].schema
    narrow = TrainedModel.initial(other.model_copy(update={"tasks": other.tasks[:1]}), hidden=(16, 16))
    with pytest.raises(PersonalizationError, match="regional base's tasks"):
        choose_personalization(untrained, site, seed=0, regional=narrow)


@pytest.mark.slow
def test_a_regional_base_that_only_fits_the_rows_it_learned_is_not_chosen_when_validated_without_them(site, untrained, fitted):
    # The regional base has learned this site's rows (as a seen site's has); its base without the site teaches nothing.
    result = choose_personalization(untrained, site, seed=0, regional=fitted, regional_validation=scrambled(untrained))
    assert not result.steps_selection["chosen"].startswith("regional:")
    assert result.steps_selection["regional_validation"] == "a base of the region trained without this site"


@pytest.mark.slow
def test_the_chosen_regional_candidate_is_refit_from_the_regional_base_not_its_validation_base(site, untrained, fitted):
    from_fitted = choose_personalization(untrained, site, seed=0, regional=fitted)
    validated_on_fitted = choose_personalization(untrained, site, seed=0, regional=scrambled(fitted), regional_validation=fitted)
    assert validated_on_fitted.steps_selection["chosen"] == from_fitted.steps_selection["chosen"]
    assert validated_on_fitted.steps_selection["chosen"].startswith("regional:")
    assert validated_on_fitted.metrics != from_fitted.metrics  # refit from the scrambled regional base, which scores otherwise


def test_a_validation_base_without_a_regional_base_is_refused(site, untrained):
    with pytest.raises(PersonalizationError, match="without the regional base"):
        choose_personalization(untrained, site, seed=0, regional_validation=untrained)
