"""What every command prints through: the console, round progress bars and timed progress lines."""

from __future__ import annotations

from rich.console import Console

# soft_wrap: a printed line is never broken by rich (a command to paste, a path, a log line survives a pipe);
# the terminal wraps it if it must. Tables still fit the console's width.
console = Console(soft_wrap=True)
console_err = Console(stderr=True, soft_wrap=True)  # notes that must not mix with data on standard output

#: Under this width a table of ten or so columns cuts every cell to a few letters ("per…"): print blocks instead.
WIDE_TABLE = 150


def print_rows(title: str, columns: list[str], rows: list[list[str]], heading: int = 1) -> None:
    """``rows`` as a table where it fits, else one block per row (the demo table's layout).

    A block is the row's first ``heading`` cells on one bold line, then one
    indented ``column: value`` line per other cell that is not empty, so a
    row reads whole at 80 columns and in a log.
    """
    from rich.markup import escape
    from rich.table import Table

    if console.width >= WIDE_TABLE:
        table = Table(title=escape(title))
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))  # a site or user name is text, never markup
        console.print(table)
        return
    console.print(escape(title), highlight=False)
    for row in rows:
        console.print("[bold]" + escape("  ".join(cell for cell in row[:heading] if cell)) + "[/]", highlight=False)
        for column, cell in zip(columns[heading:], row[heading:]):
            if cell:
                console.print(f"  {escape(column)}: {escape(cell)}", highlight=False)


def print_json(document) -> None:
    """One JSON document on standard output, unstyled and unwrapped (``--json``)."""
    import json
    import sys

    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


class ProgressObserver:
    """Training progress: one line per round (loss, seconds, time left) and per failed site, under a rich progress bar.

    The time left is the rounds to go times the mean round so far, leaving out
    the first round the process ran (it includes starting Ray): :func:`time_left`.
    """

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console
        )
        self.failed: dict[str, dict[int, str]] = {}  # site -> round -> reason
        self.sat_out: dict[str, dict[int, str]] = {}  # site -> round -> reason, for sites whose training diverged on every restart

    def start(self, first_round: int, rounds: int) -> None:
        import time

        self.rounds = rounds
        self.durations: list[float] = []
        self.last = time.perf_counter()
        self.task = self.progress.add_task("", total=rounds, completed=first_round - 1)
        if first_round > 1:
            left = f"rounds {first_round}-{rounds} to go" if first_round <= rounds else "its final evaluation to go"
            console.print(f"resuming after round {first_round - 1} of {rounds} (its checkpoint): {left}", highlight=False)
        self.progress.start()

    def eta(self, round_: int) -> float | None:
        return time_left(self.durations, self.rounds - round_)

    def round_done(self, round_: int, train: dict | None) -> None:
        import time

        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.last = now
        loss = f"loss {train['loss']:.4f}" if train else "skipped (too few sites replied)"
        eta = self.eta(round_)
        left = "final evaluation" if round_ >= self.rounds else f"ETA {_duration(eta)}" if eta is not None else "ETA after the next round (this one included start-up)"
        self.progress.console.print(f"round {round_}/{self.rounds}  {loss}  {self.durations[-1]:.1f} s  {left}", highlight=False)
        self.progress.update(self.task, completed=round_, description=loss)

    def chose_defaults(self, chosen) -> None:
        """The settings a short config left unset, as chosen from the sites' rows (fedmeta.fl.data_defaults)."""
        for c in chosen:
            console.print(f"default from the data: {c.key} = {c.value} ({c.why})", highlight=False)

    def site_mappings(self, lines: list[str]) -> None:
        """The roll call's mapping table (:func:`fedmeta.fl.mapping_status.table`): shown here because a simulation
        hides Flower's INFO log lines, where a deployment's server writes it (:class:`fedmeta.fl.app.RoundObserver`)."""
        self.progress.console.print("mapping status at the roll call (counts and digests only; no column name or value leaves a site):", highlight=False)
        for line in lines:
            self.progress.console.print(f"  {line}", highlight=False, markup=False)

    def sites_failed(self, round_: int, failures: list[tuple[str, str]]) -> None:
        from rich.markup import escape

        from fedmeta.cli.errors import without_values
        from fedmeta.fl.site_training import SAT_OUT

        for site, reason in failures:
            reason = without_values(reason)
            # A site that sits out by design (a diverged update is never released) has not failed: the run stays whole.
            sat_out = SAT_OUT in reason
            (self.sat_out if sat_out else self.failed).setdefault(site, {})[round_] = reason
            self.progress.console.print(f"[yellow]round {round_}: site {escape(site)} {'sat out' if sat_out else 'failed'}: {escape(reason)}[/]")

    def unplanned_failures(self) -> dict[str, dict[int, str]]:
        """Failed sites, leaving out the failures a run asked for (``simulation.failing_sites``, chaos testing)."""
        return {site: rounds for site, rounds in self.failed.items() if not all("(simulation.failing_sites)" in r for r in rounds.values())}

    def evaluated(self, model_round: int, evaluation: dict) -> None:
        parts = []
        for key, value in sorted(evaluation.items()):
            task, kind, metric = key.split(".")
            if metric in ("acc", "mse"):
                parts.append(f"{task} {kind[:4]} {metric} {value:.3f}")
        self.progress.console.print(f"round {model_round}: " + "  ".join(parts))

    def region_round(self, region: str, round_: int, rounds: int, train: dict | None) -> None:
        """A regional round (:mod:`fedmeta.fl.regional_rounds`): after the global rounds, one line each."""
        loss = f"loss {train['loss']:.4f}" if train else "skipped (too few sites replied)"
        console.print(f"region {region}: round {round_}/{rounds}  {loss}", highlight=False, markup=False)

    def region_done(self, region: str, outcome) -> None:
        """The region's base against the global one on the region's sites (personalized as the run evaluates), or why it kept the global one."""
        if outcome.note:
            console.print(f"region {region}: {outcome.note}", highlight=False, markup=False)
        if outcome.extra:
            scores = lambda m: "  ".join(f"{k.split('.')[0]} {k.split('.')[2]} {v:.3f}" for k, v in sorted(m.items()) if k.endswith((".acc", ".mse")))  # noqa: E731
            console.print(f"region {region}: global base {scores(outcome.extra['global_base'])}; regional base {scores(outcome.extra['regional_base'])}", highlight=False, markup=False)

    def stop(self) -> None:
        self.progress.stop()


def time_left(durations: list[float], rounds_left: int) -> float | None:
    """The rounds left times the mean round after the first this process ran; None while only that first one is known.

    The first round a process runs includes starting the simulation engine
    (Ray, its workers importing torch): on a resume it measured 11 min 49 s of
    ETA for 30 s of work, so it never enters the estimate.
    """
    measured = durations[1:]
    return rounds_left * sum(measured) / len(measured) if measured else None


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def timed_progress():
    import time

    started = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f} s[/]  {message}")


    return progress


def stage_progress():
    """:func:`timed_progress`'s lines, plus ``progress.each(items, what)``: a bar over a stage's items (sites, K values).

    A stage that personalizes every site ran for a minute without a word; the
    bar counts its items and the time taken, and its last state stays printed.
    """
    progress = timed_progress()

    def each(items, what: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        items = list(items)
        columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(what, total=len(items))
            for item in items:
                yield item
                bar.advance(task)

    progress.each = each
    return progress
