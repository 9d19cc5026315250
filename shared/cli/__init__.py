"""The ``edgefleet`` command line: one Typer app with a sub-app per role (see ``main``)."""
