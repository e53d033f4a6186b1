"""Schema matching on federations whose sites rename, recode and convert the schema, against known ground truth.

    python benchmarks/harmonization.py [--sites 10] [--seed 0] [--no-valentine] [--train] [--json]

Two federations, the hospital schema (``fedmeta.data.synthetic.hospital_schema``)
and the fraud example's (``fraud_schema``). Each site exports its rows in one of
five dialects (:data:`DIALECTS`): abbreviations, another language's column names
(German, Spanish), SI vs US units (kPa, umol/L, g/L, months), numeric codes or
other spellings for categories and labels. The vocabulary was written with the
first four in view; the fifth of each federation (French; a terse core-banking
export) was written after it was frozen and is also reported on its own. The coordinator publishes the schema
with units and the normalization statistics of its base model (means and stds;
no rows). ``fedmeta schema match``'s matcher (:func:`fedmeta.data.harmonize.match_frame`)
runs on each site's rows and is scored against the truth:

- column F1 (a site column to the right feature or label; a proposal counts
  whether or not it is flagged for review: what matching gets right before a
  person looks);
- unit accuracy (scale and offset, of correctly matched numeric columns);
- category accuracy (site values mapped to the right schema value, of
  correctly matched categorical columns and labels);
- the share of columns flagged ``review: true``, and the confident mistakes
  (not flagged, yet wrong in feature, unit or any value): the target is 0.

Valentine (``pip install "fedmeta[bench]"``), the reference, matches each
site's table to a reference site's table in the schema's own names and
values (it needs target rows; fedmeta's matcher needs only the published
statistics). Its matchers that run offline are scored by column F1 (Cupid
and Coma's instance matcher need NLTK corpora downloaded at run time and
are reported as failed where those are missing).

With ``--train`` each federation is then trained and personalized twice, as
``fedmeta train`` and ``fedmeta personalize`` would on site folders holding
the dialect rows and a ``mapping.json``: once with the true mappings, once
with the matcher's accepted as proposed, flagged columns included, except
those ``fedmeta schema match --check`` refuses (the worst case: a person who
fixes only what the tools refuse, :func:`accepted_blind`). It reports
the mean site accuracy of each and their difference (:func:`harmonized_accuracy`).
The last line is one JSON object with the figures (``--json`` prints only it).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedmeta.data.harmonize import match_frame
from fedmeta.data.mapping import MAPPING_FILE, ColumnMapping, Mapping, apply, check
from fedmeta.data.schema import Schema
from fedmeta.data.synthetic import fraud_federation_frames, hospital_federation_frames
from fedmeta.files import atomic_write_bytes

#: The coordinator's units per schema column (what the published schema states).
UNITS = {
    "hospitals": {"age": "a", "systolic_bp": "mmHg", "creatinine": "mg/dL", "hemoglobin": "g/dL", "sodium": "mmol/L"},
    "fraud": {"account_age_days": "d"},
}


@dataclass(frozen=True)
class Dialect:
    """How one site exports the schema: its names, its units (site value = schema value x factor) and its spellings."""

    name: str
    names: dict[str, str]
    factors: dict[str, float] = field(default_factory=dict)
    spellings: dict[str, dict[str, str]] = field(default_factory=dict)  # schema column -> {schema value: site value}
    held_out: bool = False  # written after the vocabulary was frozen: never tuned on


_YES_NO = {"0": "no", "1": "yes"}
DIALECTS: dict[str, list[Dialect]] = {
    "hospitals": [
        Dialect("abbreviations", {
            "age": "pt_age", "sex": "gender", "admission_type": "adm_type", "ward": "unit", "prior_admissions": "prev_adm", "charlson_index": "cci",
            "heart_rate": "hr", "systolic_bp": "sbp", "creatinine": "creat", "hemoglobin": "hgb", "sodium": "na", "wbc": "wbc",
            "readmitted_30d": "readmit", "died_in_hospital": "death", "length_of_stay_days": "los",
        }, spellings={"sex": {"F": "female", "M": "male"}, "ward": {"medical": "Med", "surgical": "Surg", "cardiology": "Cardio", "icu": "ICU"},
                      "admission_type": {"emergency": "EMERGENCY", "urgent": "URGENT", "elective": "ELECTIVE"}, "died_in_hospital": {"0": "N", "1": "Y"}}),
        Dialect("German, SI units", {
            "age": "Alter", "sex": "Geschlecht", "admission_type": "Aufnahmeart", "ward": "Station", "prior_admissions": "Vorherige_Aufnahmen",
            "charlson_index": "Charlson_Index", "heart_rate": "Herzfrequenz", "systolic_bp": "Blutdruck_systolisch_kPa", "creatinine": "Kreatinin_umol_l",
            "hemoglobin": "Haemoglobin_g_l", "sodium": "Natrium", "wbc": "Leukozyten", "readmitted_30d": "Wiederaufnahme_30d",
            "died_in_hospital": "verstorben", "length_of_stay_days": "Liegedauer",
        }, factors={"systolic_bp": 1 / 7.50062, "creatinine": 88.4, "hemoglobin": 10.0},
           spellings={"sex": {"F": "weiblich", "M": "männlich"}, "admission_type": {"emergency": "Notfall", "urgent": "dringend", "elective": "elektiv"},
                      "ward": {"medical": "Innere", "surgical": "Chirurgie", "cardiology": "Kardiologie", "icu": "Intensivstation"},
                      "readmitted_30d": {"0": "nein", "1": "ja"}, "died_in_hospital": {"0": "nein", "1": "ja"}}),
        Dialect("Spanish, numeric codes", {
            "age": "edad", "sex": "sexo", "admission_type": "tipo_ingreso", "ward": "servicio", "prior_admissions": "ingresos_previos",
            "charlson_index": "indice_charlson", "heart_rate": "frecuencia_cardiaca", "systolic_bp": "presion_sistolica", "creatinine": "creatinina_mg_dl",
            "hemoglobin": "hemoglobina", "sodium": "sodio", "wbc": "leucocitos", "readmitted_30d": "reingreso_30d", "died_in_hospital": "fallecido",
            "length_of_stay_days": "estancia_dias",
        }, spellings={"sex": {"F": "2", "M": "1"}, "admission_type": {"emergency": "1", "urgent": "2", "elective": "3"},
                      "ward": {"medical": "1", "surgical": "2", "cardiology": "3", "icu": "4"}, "readmitted_30d": {"0": "no", "1": "si"}}),
        Dialect("warehouse CamelCase, months", {
            "age": "PatientAgeMonths", "sex": "Sex", "admission_type": "AdmissionType", "ward": "WardName", "prior_admissions": "PriorAdmissions",
            "charlson_index": "CharlsonIndex", "heart_rate": "HeartRate", "systolic_bp": "SystolicBP", "creatinine": "CreatinineMgDl",
            "hemoglobin": "HemoglobinGdl", "sodium": "SodiumMmolL", "wbc": "WbcCount", "readmitted_30d": "Readmitted30d",
            "died_in_hospital": "DiedInHospital", "length_of_stay_days": "LengthOfStayDays",
        }, factors={"age": 12.0}, spellings={"died_in_hospital": {"0": "false", "1": "true"}, "readmitted_30d": {"0": "false", "1": "true"}}),
        Dialect("French (held out)", {
            "age": "âge", "sex": "sexe", "admission_type": "mode_admission", "ward": "service", "prior_admissions": "hospitalisations_antérieures",
            "charlson_index": "score_charlson", "heart_rate": "fréquence_cardiaque", "systolic_bp": "pression_systolique_mmHg",
            "creatinine": "créatininémie_µmol_l", "hemoglobin": "hémoglobine_g_dl", "sodium": "natrémie", "wbc": "globules_blancs",
            "readmitted_30d": "réhospitalisation_30j", "died_in_hospital": "décès", "length_of_stay_days": "durée_séjour_jours",
        }, factors={"creatinine": 88.4}, held_out=True,
           spellings={"sex": {"F": "femme", "M": "homme"}, "admission_type": {"emergency": "urgence", "urgent": "semi-urgent", "elective": "programmée"},
                      "ward": {"medical": "médecine", "surgical": "chirurgie", "cardiology": "cardiologie", "icu": "réanimation"},
                      "readmitted_30d": {"0": "non", "1": "oui"}, "died_in_hospital": {"0": "non", "1": "oui"}}),
    ],
    "fraud": [
        Dialect("terse core-banking (held out)", {
            "amount": "TxnAmt", "hour": "TxnHr", "merchant_category": "MerchCat", "card_present": "CardPresentInd", "country_mismatch": "XBorderInd",
            "account_age_days": "AcctTenureDays", "transactions_24h": "Txn24hCnt", "is_fraud": "FraudInd",
        }, held_out=True, spellings={"merchant_category": dict(zip(["grocery", "fuel", "restaurant", "travel", "online", "electronics"],
                                                                   ["GROC", "FUEL", "REST", "TRVL", "ONLN", "ELEC"])),
                                     "card_present": {"no": "0", "yes": "1"}}),
        Dialect("abbreviations", {
            "amount": "amt", "hour": "txn_hour", "merchant_category": "mcc", "card_present": "card_pres", "country_mismatch": "foreign",
            "account_age_days": "acct_age_days", "transactions_24h": "txn_24h", "is_fraud": "fraud_flag",
        }, spellings={"merchant_category": {m: m.capitalize() for m in ["grocery", "fuel", "restaurant", "travel", "online", "electronics"]},
                      "card_present": {"no": "N", "yes": "Y"}, "is_fraud": {"0": "N", "1": "Y"}}),
        Dialect("German", {
            "amount": "Betrag", "hour": "Stunde", "merchant_category": "Haendlerkategorie", "card_present": "Karte_vorhanden",
            "country_mismatch": "Land_abweichend", "account_age_days": "Kontoalter_Tage", "transactions_24h": "Transaktionen_24h", "is_fraud": "Betrug",
        }, spellings={"merchant_category": {"grocery": "Lebensmittel", "fuel": "Tankstelle", "restaurant": "Gastronomie", "travel": "Reisen",
                                            "online": "Online", "electronics": "Elektronik"},
                      "card_present": {"no": "nein", "yes": "ja"}, "is_fraud": {"0": "nein", "1": "ja"}}),
        Dialect("codes, months", {
            "amount": "amount", "hour": "hour", "merchant_category": "merchant_category_code", "card_present": "card_present",
            "country_mismatch": "country_mismatch", "account_age_days": "account_age_months", "transactions_24h": "transactions_24h", "is_fraud": "is_fraud",
        }, factors={"account_age_days": 12 / 365.25}, spellings={
            "merchant_category": {m: str(i + 1) for i, m in enumerate(["grocery", "fuel", "restaurant", "travel", "online", "electronics"])},
            "card_present": {"no": "0", "yes": "1"}}),
        Dialect("Spanish", {
            "amount": "importe", "hour": "hora", "merchant_category": "categoria_comercio", "card_present": "tarjeta_presente",
            "country_mismatch": "pais_distinto", "account_age_days": "antiguedad_cuenta_dias", "transactions_24h": "transacciones_24h", "is_fraud": "fraude",
        }, spellings={"merchant_category": {"grocery": "supermercado", "fuel": "gasolinera", "restaurant": "restaurante", "travel": "viajes",
                                            "online": "en linea", "electronics": "electronica"},
                      "card_present": {"no": "no", "yes": "si"}, "is_fraud": {"0": "no", "1": "si"}}),
    ],
}


def published_schema(kind: str, frames: dict[str, pd.DataFrame], schema: Schema) -> Schema:
    """The coordinator's schema: units, and the base model's statistics (pooled mean and std of the numeric features)."""
    pooled = pd.concat(frames.values())
    stats = {f.name: (float(pooled[f.name].mean()), float(pooled[f.name].std())) for f in schema.features if f.type == "numeric"}
    units = UNITS[kind]
    features = [f.model_copy(update={"unit": units.get(f.name)}) for f in schema.features]
    return schema.model_copy(update={"features": features}).with_statistics(stats)


def _site_value(value) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def in_dialect(frame: pd.DataFrame, schema: Schema, dialect: Dialect) -> tuple[pd.DataFrame, Mapping]:
    """``frame`` exported in ``dialect``, and the true mapping back to the schema."""
    out, truth = {}, {}
    categorical = {f.name for f in schema.features if f.type == "categorical"} | {t.label for t in schema.tasks if t.is_classification}
    for column in frame.columns:
        name = dialect.names[column]
        series = frame[column]
        factor = dialect.factors.get(column)
        spelled = dialect.spellings.get(column, {})
        values = {}
        if column in categorical:
            present = series.dropna().map(_site_value)
            series = present.map(lambda v: spelled.get(v, v)).reindex(series.index)
            values = {spelled.get(v, v): v for v in sorted(set(present))}
        elif factor is not None:
            series = (series * factor).round(4)
        out[name] = series
        truth[name] = ColumnMapping(feature=column, scale=1.0 / factor if factor else 1.0, values=values)
    return pd.DataFrame(out), Mapping(schema_digest=schema.digest(), columns=truth)


def federation(kind: str, n_sites: int = 8, seed: int = 0) -> tuple[Schema, dict[str, tuple[pd.DataFrame, Mapping, str]]]:
    """The published schema and each site's ``(rows in its dialect, true mapping, dialect name)``; dialects rotate over the sites."""
    schema, frames = (hospital_federation_frames if kind == "hospitals" else fraud_federation_frames)(n_sites, seed)
    published = published_schema(kind, frames, schema)
    sites = {}
    for k, (site, frame) in enumerate(frames.items()):
        dialect = DIALECTS[kind][k % len(DIALECTS[kind])]
        rows, truth = in_dialect(frame, published, dialect)
        # As the site's file reads back (``true`` cells become booleans, codes integers): what `fedmeta schema match` sees.
        sites[site] = (pd.read_csv(io.StringIO(rows.to_csv(index=False))), truth, dialect.name)
    return published, sites


def predicted_mappings(schema: Schema, sites: dict[str, tuple[pd.DataFrame, Mapping, str]]) -> dict[str, Mapping]:
    """What ``fedmeta schema match`` proposes at each site (the mapper's format)."""
    return {site: match_frame(schema, rows).mapping for site, (rows, _, _) in sites.items()}


@dataclass
class Score:
    """Counts over columns, summed over sites."""

    true_pairs: int = 0
    proposed: int = 0
    correct: int = 0
    numeric: int = 0
    unit_right: int = 0
    values: int = 0
    values_right: int = 0
    columns: int = 0
    review: int = 0
    confident_mistakes: list[str] = field(default_factory=list)

    def add(self, site: str, predicted: Mapping, truth: Mapping) -> None:
        for column, true in truth.columns.items():
            guess = predicted.columns.get(column)
            self.columns += 1
            self.true_pairs += true.feature is not None
            if guess is None:
                continue
            self.review += guess.review
            self.proposed += guess.feature is not None
            wrong = guess.feature != true.feature
            if not wrong and true.feature is not None:
                self.correct += 1
                if true.values:
                    right = sum(guess.values.get(k, k) == v for k, v in true.values.items())
                    self.values += len(true.values)
                    self.values_right += right
                    wrong = right < len(true.values)
                else:
                    self.numeric += 1
                    unit_ok = abs(guess.scale - true.scale) <= 1e-3 * abs(true.scale) and abs(guess.offset - true.offset) <= 1e-3
                    self.unit_right += unit_ok
                    wrong = not unit_ok
            if wrong and not guess.review:
                self.confident_mistakes.append(f"{site}:{column}->{guess.feature}")

    def figures(self) -> dict:
        precision = self.correct / self.proposed if self.proposed else 0.0
        recall = self.correct / self.true_pairs if self.true_pairs else 0.0
        return {
            "column_f1": (round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0) if self.true_pairs else None,
            "unit_accuracy": round(self.unit_right / self.numeric, 4) if self.numeric else None,
            "category_accuracy": round(self.values_right / self.values, 4) if self.values else None,
            "review_share": round(self.review / self.columns, 4) if self.columns else 0.0,
            "confident_mistakes": len(self.confident_mistakes),
        }


def f1(correct: int, proposed: int, true: int) -> float:
    p, r = (correct / proposed if proposed else 0.0), (correct / true if true else 0.0)
    return round(2 * p * r / (p + r), 4) if p + r else 0.0


def valentine_f1(schema: Schema, sites: dict[str, tuple[pd.DataFrame, Mapping, str]], reference: pd.DataFrame,
                 counts: dict[str, list[int]] | None = None) -> dict[str, float | str]:
    """Column F1 of each offline Valentine matcher: each site's table against ``reference`` (rows in the schema's names).

    ``counts`` accumulates each matcher's (correct, proposed, true) pairs, for an F1 over several federations.
    """
    try:
        from valentine import valentine_match
        from valentine.algorithms import Coma, Cupid, DistributionBased, JaccardDistanceMatcher, SimilarityFlooding
    except ImportError:
        return {"valentine": "not installed (pip install \"fedmeta[bench]\")"}
    matchers = {"Coma": Coma, "Coma+instances": lambda: Coma(use_instances=True), "Cupid": Cupid, "SimilarityFlooding": SimilarityFlooding,
                "JaccardDistance": JaccardDistanceMatcher, "DistributionBased": DistributionBased}
    out: dict[str, float | str] = {}
    for name, make in matchers.items():
        correct = proposed = true = 0
        try:
            for rows, truth, _ in sites.values():
                pairs = valentine_match([rows, reference], make(), df_names=["site", "schema"], instance_sample_size=500).one_to_one_hungarian()
                guess = {p.source_column: p.target_column for p in pairs}
                proposed += len(guess)
                true += sum(m.feature is not None for m in truth.columns.values())
                correct += sum(truth.columns[c].feature == t for c, t in guess.items() if c in truth.columns)
        except Exception as e:  # a matcher that cannot run here (NLTK corpora it would download) is reported, not fatal
            out[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            continue
        out[name] = f1(correct, proposed, true)
        if counts is not None:
            counts[name] = [a + b for a, b in zip(counts.get(name, [0, 0, 0]), (correct, proposed, true))]
    return out


def same_rows_out(a: Mapping, b: Mapping) -> bool:
    """Whether two mappings turn a site's rows into the same schema rows: same targets, conversions (to 1e-3) and recodings."""
    def rule(m: ColumnMapping) -> tuple:
        return m.feature, round(m.scale, 3), round(m.offset, 3), {k: v for k, v in m.values.items() if k != v}
    return a.columns.keys() == b.columns.keys() and all(rule(a.columns[c]) == rule(b.columns[c]) for c in a.columns)


def _cells_differing(a: pd.DataFrame, b: pd.DataFrame) -> int:
    columns = sorted(set(a.columns) | set(b.columns))
    return int((a.reindex(columns=columns).astype(str) != b.reindex(columns=columns).astype(str)).to_numpy().sum())


def reviewed(mapping: Mapping) -> Mapping:
    """``mapping`` with every review flag cleared, nothing else changed: each proposal accepted as it stands."""
    return mapping.model_copy(update={"columns": {c: r.model_copy(update={"review": False}) for c, r in mapping.columns.items()}})


def accepted_blind(schema: Schema, rows: pd.DataFrame, proposed: Mapping, truth: Mapping) -> tuple[Mapping, int]:
    """What a person who looks only where the tools refuse ends with, and how many columns they had to fix.

    Every proposal is accepted, flagged or not, except a column whose proposal ``fedmeta schema match --check``
    (and training) refuses, such as a category value left without a schema value: that column is set right.
    """
    columns, fixed = dict(reviewed(proposed).columns), 0
    for column in proposed.columns:
        alone = truth.model_copy(update={"columns": {**truth.columns, column: columns[column]}})
        if check(alone, rows, schema, "site"):
            columns[column], fixed = truth.columns[column], fixed + 1
    return proposed.model_copy(update={"columns": columns}), fixed


def harmonized_accuracy(schema: Schema, sites: dict[str, tuple[pd.DataFrame, Mapping, str]], predicted: dict[str, Mapping], out: Path,
                        rounds: int = 20, seed: int = 0) -> dict:
    """Mean site accuracy after training and personalizing through the true mappings, and through the matcher's.

    Each way, every site is a folder (``train.csv`` in its dialect, ``mapping.json``) under one ``schema.json``,
    read by the loader training uses (:func:`fedmeta.evaluate.folder_federation`); training is FOMAML over
    Flower's simulation and each site then gets the default personalization (:func:`fedmeta.evaluate.harness.federated`).
    """
    from fedmeta.evaluate.federations import folder_federation
    from fedmeta.evaluate.harness import federated
    from fedmeta.evaluate.site_scores import aggregate

    figures: dict = {}
    blind = {site: accepted_blind(schema, rows, predicted[site], truth) for site, (rows, truth, _) in sites.items()}
    figures["columns_refused_by_check"] = sum(fixed for _, fixed in blind.values())
    for which, mappings in (("true", {site: truth for site, (_, truth, _) in sites.items()}), ("matched", {s: m for s, (m, _) in blind.items()})):
        data = out / which / "data"
        for site, (rows, _, _) in sites.items():
            atomic_write_bytes(data / site / "train.csv", rows.to_csv(index=False).encode())
            reviewed(mappings[site]).save(data / site / MAPPING_FILE)
        schema.save(data / "schema.json")
        fed = folder_federation(data, out / which / "split", unseen=[], seed=seed)
        _, tuned = federated(fed, "fomaml", rounds, (64, 64), 10, out / which / "runs", seed, lambda message: None, shots_curve=False)
        figures[which] = round(aggregate(tuned.seen)["acc"], 4)
        if which == "matched":
            differ = [s for s, (_, truth, _) in sites.items() if not same_rows_out(mappings[s], truth)]
            figures["sites_mapped_differently"] = len(differ)
            figures["cells_mapped_differently"] = sum(_cells_differing(apply(mappings[s], sites[s][0]), apply(sites[s][1], sites[s][0])) for s in differ)
    figures["difference_points"] = round(100 * (figures["matched"] - figures["true"]), 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10, help="sites per federation (dialects rotate over them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-valentine", action="store_true", help="skip Valentine's matchers")
    parser.add_argument("--train", action="store_true", help="also train on the true and the matched mappings and compare accuracy")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each training run (with --train)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else print
    figures: dict = {"sites_per_federation": args.sites, "seed": args.seed}
    total, valentine_counts = Score(), {}
    for kind in ("hospitals", "fraud"):
        schema, sites = federation(kind, args.sites, args.seed)
        started = time.perf_counter()
        predicted = predicted_mappings(schema, sites)
        seconds = time.perf_counter() - started
        score, held_out = Score(), Score()
        held = {d.name for d in DIALECTS[kind] if d.held_out}
        for site, (_, truth, dialect) in sites.items():
            for s in (score, total) + ((held_out,) if dialect in held else ()):
                s.add(site, predicted[site], truth)
        figures[kind] = {**score.figures(), "match_seconds": round(seconds, 2), "held_out_dialects": held_out.figures()}
        say(f"{kind}: {len(sites)} sites in {len(DIALECTS[kind])} dialects, {score.columns} columns: {figures[kind]}")
        for mistake in score.confident_mistakes:
            say(f"  confident mistake: {mistake}")
        if not args.no_valentine:
            _, reference_frames = (hospital_federation_frames if kind == "hospitals" else fraud_federation_frames)(1, args.seed + 1000)
            figures[kind]["valentine_f1"] = valentine_f1(schema, sites, next(iter(reference_frames.values())), valentine_counts)
            say(f"  Valentine column F1: {figures[kind]['valentine_f1']}")
        if args.train:
            with tempfile.TemporaryDirectory() as out:
                figures[kind]["training"] = harmonized_accuracy(schema, sites, predicted, Path(out), args.rounds, args.seed)
            say(f"  mean site accuracy, true mappings against the matcher's: {figures[kind]['training']}")
    figures["overall"] = total.figures()
    if valentine_counts:
        # Each matcher that ran on both federations, scored over all their columns at once, as the overall figure is.
        figures["overall"]["valentine_f1"] = {name: f1(*c) for name, c in valentine_counts.items() if c[2] == total.true_pairs}
    say(f"overall: {figures['overall']}")
    print(json.dumps(figures))
    sys.exit(0)


if __name__ == "__main__":
    main()
