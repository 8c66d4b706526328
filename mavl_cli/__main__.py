from mavl_cli.cli import main

main()
