from palr.cli.main import main

main()
