from mavl_cli.cli.app import main

main()
