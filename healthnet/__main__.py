"""``python -m healthnet`` is the ``healthnet`` command."""

from healthnet.cli import main

main()
