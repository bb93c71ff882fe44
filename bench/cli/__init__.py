"""The command line on top of everything: `main` parses `exitbench ...` (bench.cli.main), each command's parser
lives in bench.cli.commands and calls one `cli_*` function of the package that does the work, imported only when
the command runs so `exitbench --help` stays fast."""
