"""One split rule: the rows a site holds out are the same wherever it is loaded, and never trained on."""

import numpy as np
import pytest
import torch

from fedmeta.data import hospital_federation, load_site, write_hospital_federation
from fedmeta.data.site import held_out_mask
from fedmeta.fl import site_training
from fedmeta.fl.app import _synthetic_federation, site_for
from fedmeta.fl.config import RunConfig


class _Context:
    def __init__(self, node_config):
        self.node_config = node_config


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    schema, paths = write_hospital_federation(out, n_sites=4, seed=7)
    return out, schema, sorted(paths)


def test_every_way_of_loading_a_site_holds_out_the_same_rows(federation):
    folder, schema, paths = federation
    seed = 7
    csv = RunConfig.from_dict({"federation": {"kind": "csv", "data_dir": str(folder), "n_sites": 4, "seed": seed}})
    synthetic = RunConfig.from_dict({"federation": {"kind": "hospitals", "n_sites": 4, "seed": seed}})
    in_memory = {s.name: s for s in _synthetic_federation(synthetic.federation.model_dump_json())}
    for partition, path in enumerate(paths):
        simulated = site_for(_Context({"partition-id": partition}), csv)
        deployed = site_for(_Context({"data-path": str(path), "schema-path": str(schema), "site-name": path.stem}), csv)
        # What `fedmeta personalize --data <file>` loads with a base trained on this federation.
        personalized = load_site(path, schema, test_fraction=csv.federation.test_fraction, seed=csv.federation.seed)
        generated = in_memory[path.stem]
        for other in (deployed, personalized, generated):
            assert other.name == simulated.name
            assert np.array_equal(other.test_mask, simulated.test_mask), (path.stem, other.name)
        assert 0 < simulated.test_mask.sum() < simulated.n_rows


def test_the_split_depends_on_the_site_and_the_federation_seed_only():
    a = held_out_mask("st-marys", 200, 0.25, seed=0)
    assert np.array_equal(a, held_out_mask("st-marys", 200, 0.25, seed=0))
    assert not np.array_equal(a, held_out_mask("st-johns", 200, 0.25, seed=0))
    assert not np.array_equal(a, held_out_mask("st-marys", 200, 0.25, seed=1))
    with pytest.raises(ValueError, match="test_fraction must be in"):
        held_out_mask("st-marys", 200, 0.0, seed=0)


def _update_with_poisoned_rows(algorithm: str, poison_held_out: bool) -> dict[str, torch.Tensor]:
    """A site's local update after the features of its held-out rows (or, as the control, its training rows) are set to NaN."""
    site = hospital_federation(n_sites=1, seed=3)[0]
    rows = site.test_mask if poison_held_out else ~site.test_mask
    site.x = site.x.copy()
    site.x[rows] = np.nan
    config = RunConfig.from_dict({"algorithm": {"name": algorithm}, "model": {"hidden": [8]}, "local": {"steps": 3}})
    state = site_training.build_algorithm(config).init_state(site_training.build_model(config, site))
    flat = {f"{g}.{k}": v for g, values in state.items() for k, v in values.items()}
    update, _ = site_training.local_update(config, site, flat, round_seed=1)
    return update


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile", "fedavg"])
def test_local_training_never_touches_a_held_out_row(algorithm):
    # Any held-out row that reached training would turn the update into NaN.
    assert all(torch.isfinite(t).all() for t in _update_with_poisoned_rows(algorithm, poison_held_out=True).values())
    # The control: poisoned training rows do reach it.
    assert not all(torch.isfinite(t).all() for t in _update_with_poisoned_rows(algorithm, poison_held_out=False).values())


def test_fedmeta_personalize_scores_exactly_the_rows_training_held_out(federation, tmp_path):
    from typer.testing import CliRunner

    from fedmeta.cli import app
    from fedmeta.fl.app import initial_state
    from fedmeta.fl.run_dir import RunDir
    from fedmeta.manifest import read_manifest
    from fedmeta.registry import SiteHome

    folder, schema, paths = federation
    config = RunConfig.from_dict({"model": {"hidden": [8]}, "federation": {"kind": "csv", "data_dir": str(folder), "n_sites": 4, "seed": 7, "test_fraction": 0.3}})
    run = RunDir(tmp_path / "run")
    run.create(config)
    run.save_base_model(initial_state(config), config, round_=1)
    (tmp_path / "home").mkdir()
    path = paths[2]
    result = CliRunner().invoke(app, ["personalize", "--data", str(path), "--schema", str(schema), "--base", str(run.path), "--site-home", str(tmp_path / "home"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    home = SiteHome(tmp_path / "home")
    lineage = read_manifest(home.folder(home.current(path.stem))).data
    trained = site_for(_Context({"partition-id": 2}), config)
    assert lineage["held_out_rows_sha256"] == trained.held_out_digest() and lineage["test_fraction"] == 0.3
