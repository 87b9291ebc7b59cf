"""The ``fastmetamer`` command line: one module per subcommand, wired in :mod:`.main`."""
