from tunex.cli import main

main()
