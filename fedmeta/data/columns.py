"""Which columns a site's files must carry, and one line for each file that lacks one.

Not every site has every task: a site carries the tasks whose label column
is in at least one of its files (its training file, and its test file if it
has one), and a row with an empty label is simply not used for that task.
What is refused is a **file** of the site without the label column of a task
its site carries (a test file without the label: the site trains the task but
could never be scored on it), or a site that carries no task at all (every
file then lacks every label). Every file must carry every feature.

These are pure functions of column names, so ``fedmeta schema infer``, the
check before round 1 (:func:`fedmeta.data.federation.check_columns`) and
:class:`~fedmeta.data.site.SiteData` apply one rule and print one wording.

>>> missing_labels([("a/train.csv", ["age", "died"]), ("a/test.csv", ["age"])], [("mortality", "died")])
["a/test.csv has no column 'died' (label of task 'mortality')"]
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from fedmeta.data.near_miss import did_you_mean

#: A file of a site, as these checks see it: its name and its column names.
FileColumns = tuple[str, Collection[str]]


def missing_labels(site: Sequence[FileColumns], tasks: Sequence[tuple[str, str]]) -> list[str]:
    """One line per file of ``site`` that lacks the label column of a task the site carries.

    ``tasks`` are ``(task, label column)`` pairs; a site that carries none of
    them must carry them all, so each of its files is named with every label.
    """
    carried = [(task, label) for task, label in tasks if any(label in columns for _, columns in site)]
    expected = carried or list(tasks)
    lines = []
    for source, columns in site:
        lacking = [(task, label) for task, label in expected if label not in columns]
        if lacking:
            what = ", no column ".join(f"{label!r} (label of task {task!r})" for task, label in lacking)
            others = [c for c in columns if c not in {label for _, label in tasks}]
            lines.append(f"{source} has no column {what}{did_you_mean([label for _, label in lacking], others)}")
    return lines


def missing_features(source: str, columns: Collection[str], features: Sequence[str], schema_columns: Iterable[str] = ()) -> str | None:
    """The line for a file without some of ``features`` (with the near miss among its other columns), else None.

    >>> missing_features("c/train.csv", ["mean_radius", "died"], ["mean radius"], ["died"])
    "c/train.csv: missing feature column(s) ['mean radius']; did you mean 'mean_radius'?"
    """
    missing = [f for f in features if f not in columns]
    if not missing:
        return None
    taken = set(features) | set(schema_columns)
    return f"{source}: missing feature column(s) {missing}{did_you_mean(missing, [c for c in columns if c not in taken])}"
