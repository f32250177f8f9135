"""The `hf-distill` command line: one module per subcommand, each exposing `make_parser(prog)` and `run(argv)`."""
