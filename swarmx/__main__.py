from swarmx.cli.main import main

main()
