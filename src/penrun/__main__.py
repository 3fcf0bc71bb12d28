from penrun.cli import main

main()
