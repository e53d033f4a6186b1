"""The model registry and manifests: lineage, promotion, audit, tampering, concurrent writers."""

import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from fedmeta.manifest import Manifest, ManifestError, sha256_bytes
from fedmeta.registry import RegistryError, SiteHome


def _store(home, payload: bytes, site="st-marys", kind="personalized", parent=None):
    manifest = Manifest(kind=kind, site=site, model_file="model.onnx", sha256="", files={})
    return home.store({"model.onnx": payload, "state.pt": b"weights"}, manifest, parent=parent, actor="ana")


def test_register_promote_and_rollback_walk_back_through_history(tmp_path):
    home = SiteHome(tmp_path)
    v1, _ = _store(home, b"one")
    v2, _ = _store(home, b"two", parent=v1.version)
    v3, _ = _store(home, b"three", parent=v2.version)
    reg = home.registry
    for v in (v1, v2, v3):
        reg.promote("st-marys", v.version, actor="ana")
    assert reg.current("st-marys") == v3
    assert reg.rollback("st-marys", actor="bo") == v2
    assert reg.rollback("st-marys", actor="bo") == v1
    with pytest.raises(RegistryError, match="no earlier promoted version"):
        reg.rollback("st-marys", actor="bo")
    assert [(e.action, e.version, e.actor) for e in reg.audit() if e.action != "register"] == [
        ("promote", 1, "ana"), ("promote", 2, "ana"), ("promote", 3, "ana"), ("rollback", 2, "bo"), ("rollback", 1, "bo")
    ]
    assert all(e.sha256 for e in reg.audit())


def test_identical_model_bytes_are_one_version(tmp_path):
    home = SiteHome(tmp_path)
    first, created = _store(home, b"same")
    again, created_again = _store(home, b"same")
    assert created and not created_again and again == first
    assert len(list((tmp_path / "models").iterdir())) == 1


def test_promotion_is_per_site_and_never_of_a_base(tmp_path):
    home = SiteHome(tmp_path)
    base, _ = _store(home, b"base", site=None, kind="base")
    mine, _ = _store(home, b"mine", parent=base.version)
    with pytest.raises(RegistryError, match="global base"):
        home.registry.promote("st-marys", base.version, actor="ana")
    with pytest.raises(RegistryError, match="belongs to site 'st-marys'"):
        home.registry.promote("elsewhere", mine.version, actor="ana")
    with pytest.raises(RegistryError, match="no model version v9"):
        home.registry.get(9)


def test_audit_log_is_append_only(tmp_path):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"x")
    home.registry.promote("st-marys", version.version, actor="ana")
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    for statement in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "DELETE FROM promotions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(statement)
    con.close()


def test_loading_a_tampered_model_file_is_refused(tmp_path):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"genuine")
    assert home.load(version)[1] == b"genuine"
    (home.folder(version) / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match="model.onnx does not match the hash the registry recorded"):
        home.load(version)


def _forge(folder, name: str, payload: bytes, top_level: bool) -> None:
    """Replace a file and rewrite the manifest to agree with it, as an attacker with write access to the folder would."""
    (folder / name).write_bytes(payload)
    manifest = Manifest.model_validate_json((folder / "manifest.json").read_text())
    update = {"files": {**manifest.files, name: sha256_bytes(payload)}}
    if top_level:
        update["sha256"] = sha256_bytes(payload)
    (folder / "manifest.json").write_text(manifest.model_copy(update=update).to_json())


@pytest.mark.parametrize("top_level", [False, True], ids=["files-entry", "files-entry-and-top-level-hash"])
def test_a_swapped_model_file_with_a_matching_manifest_edit_is_refused(tmp_path, top_level):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"genuine")
    _forge(home.folder(version), "model.onnx", b"swapped", top_level)
    with pytest.raises(ManifestError, match=r"model\.onnx does not match the hash the registry recorded for v1"):
        home.load(version)


def test_a_swapped_state_file_with_a_matching_manifest_edit_is_refused_by_load_trained(tmp_path):
    from fedmeta.personalize import load_trained

    home = SiteHome(tmp_path)
    version, _ = _store(home, b"genuine")
    _forge(home.folder(version), "state.pt", b"other weights", top_level=False)
    with pytest.raises(ManifestError, match=r"state\.pt does not match the hash the registry recorded for v1"):
        load_trained(home, version)


def test_a_swapped_base_model_with_a_matching_manifest_edit_is_refused_by_load_base(tmp_path):
    from fedmeta.personalize import BASE_FILE, load_base

    home = SiteHome(tmp_path)
    manifest = Manifest(kind="base", model_file=BASE_FILE, sha256="", files={})
    version, _ = home.store({BASE_FILE: b"genuine base"}, manifest, actor="ana")
    _forge(home.folder(version), BASE_FILE, b"other base", top_level=True)
    with pytest.raises(ManifestError, match=r"base_model\.pt does not match the hash the registry recorded for v1"):
        load_base("v1", home)


def test_an_edited_manifest_is_refused_even_when_every_file_is_intact(tmp_path):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"genuine")
    path = home.folder(version) / "manifest.json"
    manifest = Manifest.model_validate_json(path.read_text())
    path.write_text(manifest.model_copy(update={"site": "elsewhere"}).to_json())  # e.g. relabelled classes or schema
    with pytest.raises(ManifestError, match=r"manifest\.json does not match the hash the registry recorded"):
        home.load(version)


def test_the_registry_records_the_hash_of_every_file_at_registration(tmp_path):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"genuine")
    folder = home.folder(version)
    assert version.files == {name: sha256_bytes((folder / name).read_bytes()) for name in ("model.onnx", "state.pt", "manifest.json")}
    assert home.registry.get(version.version).files == version.files


def test_missing_model_file_is_reported_by_name(tmp_path):
    home = SiteHome(tmp_path)
    version, _ = _store(home, b"x")
    (home.folder(version) / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="model.onnx is missing"):
        home.load(version)


def test_two_processes_registering_at_once_do_not_corrupt_the_registry(tmp_path):
    script = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from fedmeta.manifest import Manifest
        from fedmeta.registry import SiteHome
        home = SiteHome({str(tmp_path)!r})
        writer = sys.argv[1]
        while not pathlib.Path({str(tmp_path / "go")!r}).exists():  # start together
            time.sleep(0.005)
        for i in range(100):
            manifest = Manifest(kind="personalized", site="site-" + writer, model_file="model.onnx", sha256="", files={{}})
            version, created = home.store({{"model.onnx": f"{{writer}}-{{i}}".encode()}}, manifest, actor=writer)
            assert created
            home.registry.promote("site-" + writer, version.version, actor=writer)
        """
    )
    SiteHome(tmp_path)  # create the schema first, as a site's first command would
    procs = [subprocess.Popen([sys.executable, "-c", script, w], stderr=subprocess.PIPE, text=True) for w in ("a", "b")]
    time.sleep(1.0)
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    home = SiteHome(tmp_path)
    versions = home.registry.versions()
    assert len(versions) == 200 and len({v.version for v in versions}) == 200
    assert {v.site for v in versions} == {"site-a", "site-b"}
    assert sum(e.action == "register" for e in home.registry.audit()) == 200
    assert sum(e.action == "promote" for e in home.registry.audit()) == 200
    for v in versions:
        home.load(v)  # every registered folder is complete and verifies
    con = sqlite3.connect(tmp_path / "registry.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_a_private_file_is_never_readable_by_others_and_a_plain_one_gets_the_usual_mode(tmp_path):
    import os

    from fedmeta.files import _UMASK, atomic_write_bytes

    old = os.umask(0)  # the most permissive umask: only the write itself decides
    try:
        atomic_write_bytes(tmp_path / "key", b"secret", private=True)
        atomic_write_bytes(tmp_path / "plain", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~_UMASK  # the process's umask, read at import
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"


def test_a_new_site_home_is_private_to_its_owner(tmp_path):
    home = SiteHome(tmp_path / "new" / "home")
    _store(home, b"one")
    assert (home.path.stat().st_mode & 0o777) == 0o700
    assert ((home.path / "registry.sqlite").stat().st_mode & 0o777) == 0o600


def test_an_existing_home_with_wider_modes_keeps_working(tmp_path):
    home = SiteHome(tmp_path / "home")
    v1, _ = _store(home, b"one")
    home.path.chmod(0o755)
    (home.path / "registry.sqlite").chmod(0o644)
    reopened = SiteHome.existing(tmp_path / "home")
    v2, created = _store(reopened, b"two", parent=v1.version)
    assert created and reopened.registry.verify().ok
    assert (home.path.stat().st_mode & 0o777) == 0o755  # an operator's choice of mode is left alone
