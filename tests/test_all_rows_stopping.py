"""How an all-rows fine-tune ended is said as it happened: early-stopped by the validation loss, or cut at the step cap."""

import pytest

from fedmeta.data import hospital_federation
from fedmeta.personalize.all_rows import fit_all_rows, stopping_note
from fedmeta.trained import TrainedModel


@pytest.fixture(scope="module")
def site_and_base():
    site = hospital_federation(n_sites=1)[0]
    return site, TrainedModel.initial(site.schema, hidden=(8,))


def test_a_run_cut_at_the_step_cap_is_not_called_early_stopped(site_and_base):
    site, base = site_and_base
    # Patience needs 5 checks of 10 steps without improvement: a cap of 30 steps ends the run first.
    _, steps, how = fit_all_rows(base, site, site.tasks, list(base.params), max_steps=30, check_every=10, patience=5)
    assert not how["early_stopped"] and how["stopped_at"] == 30
    assert stopping_note(how) == f"stopped at the cap of 30 steps, the validation loss not yet done improving; best at step {steps}"


def test_a_run_whose_validation_loss_stops_improving_is_early_stopped_where_it_stopped(site_and_base):
    site, base = site_and_base
    # A zero rate never improves the validation loss: patience (2 checks of 5 steps) ends the run at step 10, far from the cap.
    _, steps, how = fit_all_rows(base, site, site.tasks, list(base.params), lr=0.0, max_steps=1000, check_every=5, patience=2)
    assert how["early_stopped"] and (steps, how["stopped_at"]) == (0, 10)
    assert stopping_note(how) == "early-stopped on a validation fifth at step 10, best at step 0"
