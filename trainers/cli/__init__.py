"""The command line (python -m trainers): one module per subcommand, shared progress and Cancel printing."""
