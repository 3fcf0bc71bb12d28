from penrun.app.cli import main

main()
