"""Column names as concepts: tokenization and a small built-in clinical and financial vocabulary.

A site column's name is split into tokens (snake_case, CamelCase,
SHOUTING_CASE, letters/digits), unit tokens are set aside, and runs of
tokens that the vocabulary knows (an abbreviation such as ``trestbps`` or
``cp``, a German, Spanish or French name such as ``blutdruck``) are replaced
by the English words of their concept. Two names mean the same thing when
their concept words agree: ``trestbps``, ``RestingBP`` and
``bp_systolic_rest_kpa`` all become ``resting blood pressure``.

>>> concept_words("trestbps"), concept_words("RestingBP"), concept_words("bp_systolic_rest_kpa")
(('resting', 'blood', 'pressure'), ('resting', 'blood', 'pressure'), ('systolic', 'blood', 'pressure', 'resting'))
>>> concept_words("ChestPainType"), concept_words("CHOL_TOTAL"), concept_words("Cholesterin")
(('chest', 'pain'), ('cholesterol',), ('cholesterol',))
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

#: concept (English words) -> other names of it: abbreviations, dataset spellings, German, Spanish, French.
CONCEPTS: dict[str, tuple[str, ...]] = {
    # clinical
    "age": ("age", "alter", "edad", "patient age", "pat age", "age years", "agey"),
    "sex": ("sex", "gender", "geschlecht", "sexo", "sexe", "genero", "genre", "gndr", "sx"),
    "resting blood pressure": ("trestbps", "resting bp", "restingbp", "rest bp", "sbp rest", "bp rest", "systolic bp rest", "ruheblutdruck",
                               "presion arterial reposo", "pression arterielle repos", "tension arterielle repos", "trestbp"),
    "blood pressure": ("bp", "blutdruck", "presion", "presion arterial", "pression arterielle", "tension arterielle", "ta"),
    "resting": ("rest", "ruhe", "reposo", "repos"),
    "systolic blood pressure": ("sbp", "sys bp", "syst bp", "systolic bp", "bp sys", "bp syst", "bp systolic", "nibp sys", "art sys"),
    "diastolic blood pressure": ("dbp", "dia bp", "diastolic bp", "bp dia", "bp diastolic", "nibp dia", "art dia"),
    "systolic": ("sys", "syst", "systolisch", "sistolica", "systolique"),
    "diastolic": ("dia", "dias", "diastolisch", "diastolica", "diastolique"),
    "cholesterol": ("chol", "cholesterin", "colesterol", "cholesterol", "chl", "tc", "total cholesterol", "serum cholesterol"),
    "chest pain": ("cp", "chest pain type", "chestpain", "brustschmerz", "brustschmerzen", "dolor toracico", "douleur thoracique", "angina type"),
    "max heart rate": ("thalach", "maxhr", "max hr", "hr max", "max heart rate", "maximum heart rate", "peak hr", "max puls", "fc max", "frecuencia cardiaca maxima"),
    "heart rate": ("hr", "pulse", "puls", "herzfrequenz", "frecuencia cardiaca", "frequence cardiaque", "fc", "herzrate", "pr"),
    "fasting blood sugar": ("fbs", "fasting bs", "fastingbs", "nuechternblutzucker"),
    "glucose": ("glu", "gluc", "blood sugar", "blutzucker", "glukose", "glucosa", "glycemie", "bs"),
    "creatinine": ("crea", "creat", "cr", "kreatinin", "creatinina", "creatinine", "scr", "krea"),
    "hemoglobin": ("hb", "hgb", "haemoglobin", "hamoglobin", "hemoglobina", "hemoglobine"),
    "sodium": ("na", "natrium", "sodio", "sodium", "serum sodium"),
    "potassium": ("k", "kalium", "potasio"),
    "white blood cells": ("wbc", "leukocytes", "leukozyten", "leucocitos", "leucocytes", "white cell count", "wcc"),
    "prior admissions": ("prev adm", "prior adm", "previous admissions", "vorherige aufnahmen", "ingresos previos", "admissions anterieures", "n prior admissions"),
    "charlson index": ("cci", "charlson", "charlson comorbidity index", "charlson score", "indice charlson"),
    "admission type": ("adm type", "admit type", "admission", "aufnahmeart", "tipo ingreso", "tipo de ingreso", "type admission", "type d admission"),
    "ward": ("station", "unit", "sala", "servicio", "service", "dept", "department", "abteilung", "unidad"),
    "length of stay days": ("los", "length of stay", "liegedauer", "verweildauer", "estancia", "dias estancia", "duree sejour", "duree de sejour", "stay days"),
    "died in hospital": ("died", "death", "mortality", "deceased", "verstorben", "tod", "fallecido", "muerte", "deces", "decede", "hospital death", "in hospital death", "dead"),
    "readmitted 30 days": ("readmit", "readmission", "readmitted", "readm", "wiederaufnahme", "reingreso", "readmission 30d", "readmitted 30d", "readm30"),
    "heart disease": ("target", "num", "heartdisease", "herzkrankheit", "enfermedad cardiaca", "maladie cardiaque", "dx heart", "cad", "chd", "diagnosis"),
    "weight": ("wt", "gewicht", "peso", "poids", "body weight"),
    "height": ("ht", "groesse", "korpergrosse", "altura", "taille"),
    "temperature": ("temp", "body temp", "temperatur", "temperatura"),
    "exercise angina": ("exang", "exerciseangina", "exercise induced angina"),
    "oldpeak": ("st depression", "oldpeak"),
    # financial
    "amount": ("amt", "betrag", "importe", "monto", "montant", "value", "txn amount", "transaction amount", "sum"),
    "hour": ("hr of day", "hour of day", "stunde", "uhrzeit", "hora", "heure", "txn hour", "tx hour", "hh"),
    "merchant category": ("mcc", "merchant cat", "merchant type", "haendlerkategorie", "haendler kategorie", "categoria comercio", "categorie commercant", "mcat"),
    "card present": ("cp flag", "card pres", "cardpresent", "karte vorhanden", "tarjeta presente", "carte presente", "chip present", "pos present"),
    "country mismatch": ("foreign", "cross border", "crossborder", "country diff", "land abweichend", "pais distinto", "pays different", "geo mismatch"),
    "account age days": ("acct age", "account age", "kontoalter", "antiguedad cuenta", "anciennete compte", "tenure days", "customer since days"),
    "transactions 24 hours": ("txn 24h", "tx 24h", "txns 24h", "n txn 24h", "transaktionen 24h", "transacciones 24h", "transactions 24h", "velocity 24h"),
    "fraud": ("is fraud", "fraud flag", "betrug", "fraude", "chargeback", "fraudulent"),
}

#: Words of a name that say nothing about what is measured.
FILLER = frozenset({"total", "value", "val", "num", "nr", "no", "code", "cd", "id", "flag", "is", "the", "of", "in", "at", "de", "la", "le", "el", "der", "pt",
                    "die", "das", "des", "du", "y", "and", "und", "et", "pat", "patient", "raw", "measured", "level", "lvl", "serum", "count", "cnt", "type",
                    "typ", "tipo", "x", "n"})

#: Name tokens that state a unit (read by :mod:`fedmeta.data.harmonize.units`), not what is measured.
UNIT_TOKENS = frozenset({"kpa", "mmhg", "mmol", "mmoll", "umol", "umoll", "mgdl", "mg", "dl", "gdl", "gl", "g", "l", "kg", "kgs", "lb", "lbs", "pounds",
                         "celsius", "degc", "fahrenheit", "degf", "f", "c", "years", "yrs", "yr", "jahre", "anos", "ans", "months", "mo", "mos", "monate",
                         "meses", "mois", "usd", "eur", "cents", "pct", "si", "us", "h", "hrs", "d", "days", "tage", "dias", "jours", "j"})

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")


def fold(text: str) -> str:
    """Lower case without accents or umlauts (``Hämoglobin`` -> ``hamoglobin``, ``µmol`` -> ``umol``)."""
    text = text.replace("µ", "u").replace("μ", "u").replace("ß", "ss")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()


def tokens(name: str) -> tuple[str, ...]:
    """A name's tokens: split at separators, lower/upper case changes and letter/digit boundaries, folded.

    >>> tokens("bp_systolic_rest_kpa"), tokens("ChestPainType"), tokens("SBP_REST"), tokens("txn24h"), tokens("Blutdruck_kPa")
    (('bp', 'systolic', 'rest', 'kpa'), ('chest', 'pain', 'type'), ('sbp', 'rest'), ('txn', '24', 'h'), ('blutdruck', 'kpa'))
    """
    parts = re.split(r"[^0-9A-Za-zÀ-ÿµμß]+", name)
    out = []
    for part in parts:
        # A unit spelt in mixed case (kPa, mmHg) is one token, not two words.
        out += [fold(part)] if fold(part) in UNIT_TOKENS else [fold(p) for p in _CAMEL.split(part) if p]
    return tuple(out)


@lru_cache(maxsize=1)
def _aliases() -> dict[tuple[str, ...], tuple[str, ...]]:
    """``{alias tokens: concept words}``, every concept also an alias of itself, spelt both spaced and joined."""
    table: dict[tuple[str, ...], tuple[str, ...]] = {}
    for concept, names in CONCEPTS.items():
        words = tuple(concept.split())
        for alias in (concept, *names):
            parts = tokens(alias)
            table.setdefault(parts, words)
            table.setdefault(("".join(parts),), words)
    return table


def _split_compound(token: str) -> tuple[str, ...] | None:
    """A token that is several known aliases written together (``restingbp`` = ``resting`` + ``bp``), else None."""
    known = {k[0] for k in _aliases() if len(k) == 1 and len(k[0]) >= 2} | {"resting", "rest", "max", "min", "total", "mean", "avg"}
    best: list[tuple[str, ...] | None] = [()] + [None] * len(token)
    for end in range(1, len(token) + 1):
        for start in range(max(0, end - 24), end):
            piece = token[start:end]
            if best[start] is not None and piece in known and (best[end] is None or len(best[start]) + 1 < len(best[end])):
                best[end] = best[start] + (piece,)
    found = best[len(token)]
    return found if found and len(found) > 1 else None


def concept_words(name: str) -> tuple[str, ...]:
    """The English concept words a name stands for, unit tokens and fillers left out (see the module docstring)."""
    raw = [t for t in tokens(name) if t not in UNIT_TOKENS or len(tokens(name)) == 1]
    expanded: list[str] = []
    for t in raw:
        if (t,) not in _aliases() and not t.isdigit():
            split = _split_compound(t)
            if split:
                expanded += split
                continue
        expanded.append(t)
    table = _aliases()
    out: list[str] = []
    i = 0
    while i < len(expanded):
        for length in range(min(5, len(expanded) - i), 0, -1):
            run = tuple(expanded[i : i + length])
            words = table.get(run) or table.get(("".join(run),))
            if words:
                out += [w for w in words if w not in out]
                i += length
                break
        else:
            out.append(expanded[i])
            i += 1
    kept = tuple(w for w in out if w not in FILLER or any(w in c.split() for c in _concepts_of(out)))
    return kept or tuple(out)


def _concepts_of(words: list[str]) -> list[str]:
    """The concepts whose words are all among ``words`` (so their fillers, e.g. ``resting``, are kept)."""
    present = set(words)
    return [c for c in CONCEPTS if len(c.split()) > 1 and set(c.split()) <= present]


def unit_tokens(name: str) -> tuple[str, ...]:
    """The tokens of a name that state a unit (``cholesterol_mmol_l`` -> ``('mmol', 'l')``)."""
    return tuple(t for t in tokens(name) if t in UNIT_TOKENS)
