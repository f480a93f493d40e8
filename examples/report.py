"""Tables and plots of the Shakespeare experiment (filled in below)."""


def write_report(results: dict, out) -> None:
    pass
