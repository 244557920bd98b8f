from tokencap.cli import main

main()
