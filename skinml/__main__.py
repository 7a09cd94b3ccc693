from skinml.cli import main

main()
