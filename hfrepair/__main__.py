"""``python -m hfrepair`` runs the command line, like the ``hfrepair`` script."""

from .cli import command

command()
