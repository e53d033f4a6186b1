"""What every command prints through: the console, round progress bars and timed progress lines."""

from __future__ import annotations

from rich.console import Console

# soft_wrap: a printed line is never broken by rich (a command to paste, a path, a log line survives a pipe);
# the terminal wraps it if it must. Tables still fit the console's width.
console = Console(soft_wrap=True)


class ProgressObserver:
    """A rich progress bar with round, loss and personalized metrics."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("{task.description}"), console=console
        )

    def start(self, first_round: int, rounds: int) -> None:
        self.task = self.progress.add_task("", total=rounds, completed=first_round - 1)
        self.progress.start()

    def round_done(self, round_: int, train: dict | None) -> None:
        self.progress.update(self.task, completed=round_, description=f"loss {train['loss']:.4f}" if train else "skipped")

    def evaluated(self, model_round: int, evaluation: dict) -> None:
        parts = []
        for key, value in sorted(evaluation.items()):
            task, kind, metric = key.split(".")
            if metric in ("acc", "mse"):
                parts.append(f"{task} {kind[:4]} {metric} {value:.3f}")
        self.progress.console.print(f"round {model_round}: " + "  ".join(parts))

    def stop(self) -> None:
        self.progress.stop()




def timed_progress():
    import time

    started = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:6.1f} s[/]  {message}")


    return progress
