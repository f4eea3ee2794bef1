"""``python -m vmreplica.cli``: the same as the ``vmreplica`` command."""

from vmreplica.cli.main import main

main()
